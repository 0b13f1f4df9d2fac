"""The toy CLIP: a small open_clip ``CLIP`` trained contrastively on the synthetic world's captions.

CLIP-Dissect needs a CLIP; real ones cannot be downloaded offline. This one is registered with
open_clip under ``xai-toy-clip``, so ``open_clip.create_model_and_transforms("xai-toy-clip",
pretrained=PATH)`` loads it like any real CLIP, with open_clip's own tokenizer and transforms.

A small ViT trained on full captions learned colour and texture but named shapes poorly (36 %).
Three choices fix that: a convolutional image tower (open_clip's ModifiedResNet); captions that
name random subsets of the attributes, shape most often, so each word is learned on its own; and
a contrastive loss that counts every caption true of an image as a positive (see
``_soft_targets``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from xai_audit.tasks.core.cache import cache_dir
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.world.recipe import demo_recipe
from xai_audit.tasks.world.synthetic import (
    CATEGORY_CONCEPTS,
    WORLD_VERSION,
    atomic_directory,
    describe,
    ensure_world,
    read_attributes,
)

log = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]

TOY_CLIP_NAME = "xai-toy-clip"
CONFIG_PATH = Path(__file__).parent / "open_clip_configs" / f"{TOY_CLIP_NAME}.json"
CHECKPOINT_NAME = "open_clip_model.safetensors"
TOY_CLIP_VERSION = "1"  # bump when the training recipe changes: it keys the cache

# The caption forms that name one attribute alone; zero-shot fills in each concept word.
ZERO_SHOT_TEMPLATES: dict[str, str] = {
    "color": "a {} shape",
    "object": "a {}",
    "texture": "a {} background",
}
ATTRIBUTES: tuple[str, ...] = tuple(CATEGORY_CONCEPTS)  # color, object, texture, scene


def register_toy_clip() -> None:
    """Make ``xai-toy-clip`` a known open_clip model name (idempotent)."""
    if TOY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


@dataclass(frozen=True)
class ClipTrainSpec:
    """Hyper-parameters of the toy CLIP; all of them key its cache entry.

    ``mention_probs`` (color, object, texture, scene) is how often a caption names each
    attribute: shape is named most, being the hardest to see; an attribute named alone is
    written as the bare word half the time (the form CLIP-Dissect queries).
    """

    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    mention_probs: tuple[float, float, float, float] = (0.35, 0.8, 0.35, 0.2)
    seed: int = 0
    bf16: bool = True


def sample_mention(rng: np.random.Generator, mention_probs: tuple[float, ...]) -> tuple[frozenset[str], bool]:
    """Which attributes a training caption names (never none), and whether as a bare word."""
    while True:
        picked = frozenset(a for a, p in zip(ATTRIBUTES, mention_probs) if rng.random() < p)
        if picked:
            return picked, len(picked) == 1 and bool(rng.random() < 0.5)


def _attribute_codes(rows: list[dict[str, str]]) -> torch.Tensor:
    """(N, 4) concept indices of each image's attributes."""
    return torch.tensor([[CATEGORY_CONCEPTS[a].index(r[a]) for a in ATTRIBUTES] for r in rows])


def _soft_targets(codes: torch.Tensor, stated: torch.Tensor) -> torch.Tensor:
    """(B, B) 0/1 matrix: caption j is true of image i.

    Partial captions are true of many images in a batch ("a red shape"); treating those pairs as
    negatives, as plain CLIP does, would teach the model to ignore the very word they share.
    """
    agree = (stated[None, :, :] < 0) | (stated[None, :, :] == codes[:, None, :])
    return agree.all(-1).float()


def _contrastive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of image→text and text→image with multi-positive targets."""
    to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    to_image = -(targets / targets.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (to_text + to_image) / 2


def load_split(world_root: Path, split: str, preprocess: Preprocess) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """One split's images through open_clip's own eval transform, and their attribute rows."""
    rows = read_attributes(world_root, split)
    images = torch.stack([preprocess(Image.open(world_root / "images" / r["image"]).convert("RGB")) for r in rows])
    return images, rows


class _NotRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (it logs
    through the root logger) while a model that is about to be trained is created."""
    quiet = _NotRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def train_toy_clip(world_root: Path, spec: ClipTrainSpec) -> tuple[nn.Module, Preprocess, float]:
    """Train the toy CLIP; returns the model (eval mode), its eval transform and training seconds."""
    register_toy_clip()
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    with _quiet_random_init():  # open_clip warns that the weights are random: they are about to be trained
        model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    images, rows = load_split(world_root, "train", preprocess)
    codes = _attribute_codes(rows)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        idx = torch.from_numpy(rng.choice(len(images), spec.batch_size, replace=False))
        captions, stated = [], torch.full((spec.batch_size, len(ATTRIBUTES)), -1)
        for k, i in enumerate(idx.tolist()):
            mention, bare = sample_mention(rng, spec.mention_probs)
            captions.append(describe(rows[i], mention, bare))
            for a in mention:
                stated[k, ATTRIBUTES.index(a)] = codes[i, ATTRIBUTES.index(a)]
        x = images[idx]
        # A left-right flip keeps every attribute (upright shapes are mirror-symmetric).
        flip = torch.from_numpy(rng.random(spec.batch_size) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            image_features = model.encode_image(x, normalize=True)
            text_features = model.encode_text(tokenizer(captions), normalize=True)
            logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = _contrastive_loss(logits.float(), _soft_targets(codes[idx], stated))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 100 == 0:
            log.info("toy clip step %d/%d: loss %.4f", step + 1, spec.steps, loss.item())
    return model.eval(), preprocess, time.perf_counter() - start


@torch.no_grad()
def zero_shot_scores(
    model: nn.Module,
    images: torch.Tensor,
    rows: list[dict[str, str]],
    templates: Mapping[str, str] = ZERO_SHOT_TEMPLATES,
) -> dict[str, float]:
    """Per category: how often the best-matching concept word (in its template) is the true one."""
    model.eval()
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    image_features = torch.cat(
        [model.encode_image(images[s : s + 256], normalize=True) for s in range(0, len(images), 256)]
    )
    scores = {}
    for category, template in templates.items():
        words = CATEGORY_CONCEPTS[category]
        text_features = model.encode_text(tokenizer([template.format(w) for w in words]), normalize=True)
        predicted = (image_features @ text_features.T).argmax(1)
        truth = torch.tensor([words.index(r[category]) for r in rows])
        scores[category] = float((predicted == truth).float().mean())
    return scores


def zero_shot_accuracy(
    checkpoint: Path, world_root: Path, split: str = "val", templates: Mapping[str, str] = ZERO_SHOT_TEMPLATES
) -> dict[str, float]:
    """Zero-shot accuracy per category (color, object, texture) of a saved toy CLIP on a split."""
    register_toy_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=str(checkpoint))
    images, rows = load_split(Path(world_root), split, preprocess)
    return zero_shot_scores(model, images, rows, templates)


def default_clip_spec() -> ClipTrainSpec:
    """The toy CLIP's recipe with the bf16 and seed variant ``$XAI_AUDIT_DEMO_RECIPE`` selects."""
    return ClipTrainSpec(**asdict(demo_recipe()))


def ensure_toy_clip(world: WorldConfig = WorldConfig(), train: ClipTrainSpec | None = None) -> Path:
    """The cached toy CLIP checkpoint (``.safetensors``; ``meta.json`` beside it), trained once;
    without ``train``, the recipe variant of :func:`default_clip_spec`."""
    train = train or default_clip_spec()
    model_cfg = json.loads(CONFIG_PATH.read_text())
    final = (
        cache_dir(
            "toy_clip",
            version=WORLD_VERSION,
            recipe=TOY_CLIP_VERSION,
            world=world.model_dump(),
            train=asdict(train),
            model_cfg=model_cfg,
        )
        / "clip"
    )
    if (final / "meta.json").is_file():
        return final / CHECKPOINT_NAME
    world_root = ensure_world(world)
    model, preprocess, seconds = train_toy_clip(world_root, train)
    val_images, val_rows = load_split(world_root, "val", preprocess)
    meta = {
        "model_name": TOY_CLIP_NAME,
        "zero_shot_val": zero_shot_scores(model, val_images, val_rows),
        "zero_shot_val_bare_words": zero_shot_scores(
            model, val_images, val_rows, dict.fromkeys(ZERO_SHOT_TEMPLATES, "{}")
        ),
        "templates": ZERO_SHOT_TEMPLATES,
        "train_seconds": round(seconds, 1),
        "world_version": WORLD_VERSION,
        "world": world.model_dump(),
        "train": asdict(train),
    }
    log.info("toy clip: zero-shot %s after %.0f s", meta["zero_shot_val"], seconds)
    return save_toy_clip(model, meta, final)


def save_toy_clip(model: nn.Module, meta: dict, folder: Path) -> Path:
    """Write the checkpoint, ``open_clip_config.json`` and ``meta.json`` into ``folder`` atomically.

    The config file lets open_clip also load the folder as ``local-dir:<folder>``, without
    ``register_toy_clip``. Returns the checkpoint's final path.
    """
    config = {"model_cfg": json.loads(CONFIG_PATH.read_text()), "preprocess_cfg": model.visual.preprocess_cfg}
    with atomic_directory(folder) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / CHECKPOINT_NAME))
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / CHECKPOINT_NAME
