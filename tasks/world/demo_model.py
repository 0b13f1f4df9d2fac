"""The demo target model: a torchvision ResNet18 trained from scratch to name the world's shape.

A random network shows nothing in an audit; this one is small enough to train on two CPU cores
in minutes and has a known answer (it must attend to the shape, not the colour or background).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet18

from xai_audit.tasks.core.cache import cache_dir
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.core.errors import CheckpointError
from xai_audit.tasks.world.recipe import demo_recipe
from xai_audit.tasks.world.synthetic import SHAPES, WORLD_VERSION, atomic_directory, ensure_world, read_attributes

log = logging.getLogger(__name__)

DEMO_VERSION = "1"  # bump when the training recipe changes: it keys the cache
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DemoTrainSpec:
    """Hyper-parameters of the demo model; all of them key its cache entry.

    bf16 autocast with channels_last runs ~2× faster than fp32 on AVX-512-BF16 CPUs; the
    held-out accuracy is measured in fp32 either way.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    bf16: bool = True


def load_images(world_root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of one split as a uint8 (N, 3, H, W) tensor and their shape labels (N,)."""
    rows = read_attributes(world_root, split)
    images = np.stack([np.asarray(Image.open(world_root / "images" / r["image"]).convert("RGB")) for r in rows])
    labels = torch.tensor([SHAPES.index(r["object"]) for r in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → the float input the demo model expects (ImageNet statistics)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 200) -> float:
    """Top-1 accuracy of ``model`` (fp32, eval mode) on uint8 images."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(normalize(images[start : start + batch]))
        correct += int((logits.argmax(1) == labels[start : start + batch]).sum())
    return correct / len(images)


def train_demo_model(world_root: Path, spec: DemoTrainSpec) -> tuple[nn.Module, float]:
    """Train ResNet18 on the train split; returns the model (eval mode) and its training seconds."""
    torch.manual_seed(spec.seed)
    images, labels = load_images(world_root, "train")
    model = resnet18(num_classes=len(SHAPES)).to(memory_format=torch.channels_last)
    steps_per_epoch = len(images) // spec.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch, pct_start=0.2
    )
    generator = torch.Generator().manual_seed(spec.seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * spec.batch_size : (step + 1) * spec.batch_size]
            x = normalize(images[idx])
            # Shapes stand upright and are mirror-symmetric: a left-right flip keeps the class.
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
                loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("demo model epoch %d/%d: loss %.4f", epoch + 1, spec.epochs, loss.item())
    seconds = time.perf_counter() - start
    return model.to(memory_format=torch.contiguous_format).eval(), seconds


def default_demo_spec() -> DemoTrainSpec:
    """The demo model's recipe with the bf16 and seed variant ``$XAI_AUDIT_DEMO_RECIPE`` selects."""
    return DemoTrainSpec(**asdict(demo_recipe()))


def ensure_demo_model(world: WorldConfig = WorldConfig(), train: DemoTrainSpec | None = None) -> Path:
    """The cached demo model directory (``model.safetensors`` + ``meta.json``), trained once;
    without ``train``, the recipe variant of :func:`default_demo_spec`."""
    train = train or default_demo_spec()
    final = (
        cache_dir(
            "demo_model", version=WORLD_VERSION, recipe=DEMO_VERSION, world=world.model_dump(), train=asdict(train)
        )
        / "model"
    )
    if (final / "meta.json").is_file():
        return final
    world_root = ensure_world(world)
    model, seconds = train_demo_model(world_root, train)
    val_images, val_labels = load_images(world_root, "val")
    meta = {
        "arch": "resnet18",
        "class_names": list(SHAPES),
        "image_size": world.image_size,
        "mean": list(MEAN),
        "std": list(STD),
        "val_accuracy": accuracy(model, val_images, val_labels),
        "train_seconds": round(seconds, 1),
        "world_version": WORLD_VERSION,
        "world": world.model_dump(),
        "train": asdict(train),
    }
    save_demo_model(model, meta, final)
    log.info("demo model: val accuracy %.4f after %.0f s", meta["val_accuracy"], seconds)
    return final


def save_demo_model(model: nn.Module, meta: dict, folder: Path) -> Path:
    """Write ``model.safetensors`` + ``meta.json`` into ``folder`` atomically."""
    with atomic_directory(folder) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_demo_model(path: Path) -> tuple[nn.Module, dict]:
    """The demo model in eval mode and its ``meta.json`` (class names, normalisation, accuracy)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    model = resnet18(num_classes=len(meta["class_names"]))
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path / 'model.safetensors'}: does not match resnet18 with {len(meta['class_names'])} classes: {exc}"
        ) from exc
    return model.eval(), meta
