"""The configuration schema: the one source of truth for every option, its default and its meaning.

A config is YAML, safe-loaded and validated by these pydantic models (``extra="forbid"``). Paths in
a config file are resolved relative to the file's folder. :func:`load_config` reports every problem
at once as :class:`ConfigErrors` whose lines start with the dotted field path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from xai_audit.tasks.core.callables import names_file, split_target
from xai_audit.tasks.core.errors import XaiAuditError

PositiveInt = Annotated[int, Field(gt=0)]


def _positive_or_auto(value: Any) -> Any:
    """One error for the whole field (pydantic would report each union member separately)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"must be a positive integer or 'auto', got {value!r}")


PositiveIntOrAuto = Annotated[PositiveInt | Literal["auto"], BeforeValidator(_positive_or_auto)]


class ConfigErrors(XaiAuditError):
    """All problems of one config, each as ``(field path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{field}: {message}" for field, message in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class PreprocessConfig(_Section):
    """Input preprocessing for `checkpoint` and `python` models (others bring their own)."""

    resize: PositiveInt = Field(256, description="Shorter side is resized to this many pixels.")
    crop: PositiveInt = Field(224, description="Centre crop size in pixels (the model's input size).")
    mean: list[float] = Field([0.485, 0.456, 0.406], description="Per-channel normalisation mean (RGB).")
    std: list[float] = Field([0.229, 0.224, 0.225], description="Per-channel normalisation std (RGB).")

    @field_validator("mean", "std")
    @classmethod
    def _three_channels(cls, value: list[float]) -> list[float]:
        if len(value) != 3:
            raise ValueError("needs exactly 3 values (R, G, B)")
        return value


class ModelConfig(_Section):
    """One classifier to audit."""

    name: str = Field(..., min_length=1, description="Label for this model in every table (unique within the config).")
    source: str = Field(
        "demo",
        min_length=1,
        description=(
            "Where the model comes from, by registered name (README, Registered names): torchvision weights, timm "
            "weights (local cache or file, never downloaded), the Places365 CSAIL checkpoint, a local checkpoint, a "
            "Python callable, or the synthetic world's demo model."
        ),
    )
    arch: str | None = Field(
        None,
        description=(
            "torchvision architecture name (e.g. resnet18) for torchvision/places365/checkpoint sources; for timm a "
            "timm model name, optionally with its pretrained tag (e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k)."
        ),
    )
    weights: str | None = Field(
        None,
        description=(
            "torchvision weights enum member (e.g. IMAGENET1K_V1); for places365 an optional checkpoint path or URL."
        ),
    )
    path: str | None = Field(
        None,
        description=(
            "Local checkpoint file (.safetensors, .pt, .pth) for the checkpoint source; for timm a local weights file "
            "instead of timm's cache."
        ),
    )
    categories: str | None = Field(
        None, description="Places365 categories file (path or URL); default downloads categories_places365.txt."
    )
    callable: str | None = Field(
        None,
        description=(
            "For the python source: a function returning an nn.Module, as `file.py:function` (a file in the config's "
            "folder, no PYTHONPATH needed) or an importable `package.module:function`."
        ),
    )
    class_names: list[str] | str | None = Field(
        None, description="Class names (list or a text file, one per line) for checkpoint/python/timm sources."
    )
    num_classes: PositiveInt | None = Field(
        None, description="Number of output classes for checkpoint/python sources when class_names is not given."
    )
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="Preprocessing for checkpoint/python sources."
    )
    cam_layer: str | None = Field(
        None,
        description=(
            "Layer the CAMs read (named_modules name); default: for transformers the first norm of the last block, "
            "for CNNs the last convolutional feature map (README, CAM layers per family)."
        ),
    )
    layers: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Layers whose units are labelled (named_modules names); default: layer1-layer4 when the model has them, "
            "else the CAM layer."
        ),
    )


class WorldConfig(_Section):
    """The synthetic world used by the demo model and `world` image sets.

    Every field is part of the world's cache key, so changing one generates a new world.
    ``min_radius``/``max_radius`` bound the shape's circumscribed radius as a fraction of the
    image side: at 128 px the default shapes span one or two cells of ResNet's 4x4 ``layer4``
    grid. Shapes stand upright, tilted by at most ``max_tilt`` radians: free rotation made the
    demo model and the toy CLIP learn shape far more slowly than the time budgets allow.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    seed: int = Field(0, description="Seed of the world generator.")
    image_size: PositiveInt = Field(
        128, description="Side of the square world images in pixels (128 gives 4x4 maps at ResNet's layer4)."
    )
    n_train: PositiveInt = Field(4000, description="Training images (demo model and toy CLIP).")
    n_val: PositiveInt = Field(1000, description="Held-out images (the default image and probe sets).")
    min_radius: float = Field(0.14, gt=0, lt=0.5, description="Smallest shape radius, as a fraction of the image side.")
    max_radius: float = Field(0.24, gt=0, lt=0.5, description="Largest shape radius, as a fraction of the image side.")
    max_tilt: float = Field(0.35, ge=0, description="Largest tilt of a shape from upright, in radians.")


class ImageSetConfig(_Section):
    """The images to explain."""

    kind: Literal["world", "folder", "list", "broden", "python"] = Field(
        "world",
        description=(
            "A synthetic-world split, a folder (recursive), a CSV/text list, a Broden-format folder, or a list "
            "that Python code writes on first use (`callable`)."
        ),
    )
    root: str | None = Field(
        None,
        description="Root folder of the images (folder, list, broden kinds; list: default the list file's folder).",
    )
    list_file: str | None = Field(
        None, description="CSV (path[,label][,mask][,x0,y0,x1,y1]) or text list, for the list kind."
    )
    callable: str | None = Field(
        None,
        description=(
            "For the python kind: `package.module:function` or `file.py:function` (beside the config) returning the "
            "path of a list in the list kind's format, e.g. one it writes into the cache on first use."
        ),
    )
    split: str | None = Field("val", description="Split to use for world and broden kinds (None: all).")
    limit: PositiveInt | None = Field(None, description="Use only the first N images (deterministic order).")

    @model_validator(mode="after")
    def _kind_fields(self) -> ImageSetConfig:
        if self.kind == "list" and self.list_file is None:
            raise ValueError("kind 'list' needs list_file")
        if self.kind == "python" and self.callable is None:
            raise ValueError("kind 'python' needs callable")
        if self.kind == "list" and self.root is None:
            self.root = str(Path(self.list_file).parent)
        if self.kind in ("folder", "broden") and self.root is None:
            raise ValueError(f"kind '{self.kind}' needs root")
        return self


class ProbeConfig(_Section):
    """The probe set neuron labelling shows the models (Broden format: images + concept masks)."""

    kind: Literal["world", "broden"] = Field(
        "world", description="The synthetic world's split or a Broden-format folder (e.g. broden1_224)."
    )
    root: str | None = Field(None, description="Broden-format folder, for the broden kind.")
    split: str | None = Field("val", description="Split to use (None: every image).")
    limit: PositiveInt | None = Field(None, description="Use only the first N probe images (deterministic order).")
    batch_size: PositiveInt = Field(64, description="Probe images per forward pass.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes decoding probe images.")

    @model_validator(mode="after")
    def _kind_fields(self) -> ProbeConfig:
        if self.kind == "broden" and self.root is None:
            raise ValueError("kind 'broden' needs root")
        return self


class ConceptsConfig(_Section):
    """The concept set CLIP-Dissect chooses labels from."""

    source: Literal["world", "broden", "file", "classes"] = Field(
        "world",
        description=(
            "The world's concepts, the probe set's Broden label names, a text file (one concept per line), or each "
            "model's class names."
        ),
    )
    path: str | None = Field(
        None, description="Concept file (one per line), for the file source, e.g. the paper's 20k-word list."
    )
    categories: list[str] | None = Field(
        None, description="Broden categories whose labels become concepts (broden source); default: all."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> ConceptsConfig:
        if self.source == "file" and self.path is None:
            raise ValueError("source 'file' needs path")
        return self


class ClipConfig(_Section):
    """The CLIP model CLIP-Dissect uses (any open_clip model)."""

    model: str = Field(
        "xai-toy-clip", description="open_clip model name (e.g. ViT-B-16); xai-toy-clip is the world's toy CLIP."
    )
    pretrained: str | None = Field(
        None,
        description=(
            "open_clip pretrained tag (e.g. openai) or checkpoint path; default for xai-toy-clip: the trained toy CLIP."
        ),
    )
    template: str = Field("{}", description="Prompt template each concept is inserted into.")
    similarity: str = Field(
        "soft_wpmi",
        description="CLIP-Dissect similarity function by registered name (README, Registered names).",
    )
    batch_size: PositiveInt = Field(64, description="Probe images per CLIP forward.")

    @field_validator("template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("template needs exactly one {} where the concept goes")
        return value


class NetDissectConfig(_Section):
    """Network Dissection (Bau et al. 2017) options."""

    quantile: float = Field(
        0.005, gt=0, lt=1, description="Top share of each unit's activations that counts as active."
    )
    iou_threshold: float = Field(0.04, ge=0, le=1, description="Best IoU at which a unit counts as interpretable.")
    threshold: Literal["exact", "histogram"] = Field(
        "exact",
        description=(
            "exact: each unit's threshold is the exact top-quantile order statistic (one or two extra passes over "
            "the probe set, cached); histogram: a one-pass estimate within one histogram bin of it."
        ),
    )
    categories: list[str] | None = Field(
        None, description="Concept categories to score (e.g. [object, part, scene]); default: all."
    )


class SignificanceConfig(_Section):
    """Permutation tests of neuron labels (tasks/dissect/significance.py) and their correction."""

    permutations: int = Field(
        0,
        ge=0,
        description=(
            "Shuffles of each unit's responses across probe images per test (0: no p-values; the demo uses 1000); the "
            "smallest p-value is 1 / (permutations + 1). Seeded from the run's seed."
        ),
    )


class DissectConfig(_Section):
    """Neuron labelling."""

    enabled: bool = Field(True, description="Run the dissect stage.")
    allow_synthetic: bool = Field(
        False,
        description=(
            "Label models that were not trained on the synthetic world (every source but demo) with the world's probe "
            "images or concepts. Off, such a config is refused: its labels would name the world's shapes and colours "
            "whatever the model learnt; give a probe set of your own or Broden, or set dissect.enabled: false."
        ),
    )
    methods: list[str] = Field(
        ["clip_dissect", "netdissect"],
        min_length=1,
        description=(
            "Labelling methods by registered name (README, Registered names); netdissect needs a probe set with masks."
        ),
    )
    pooling: Literal["avg", "max"] = Field("avg", description="Spatial pooling of conv units for CLIP-Dissect.")
    top_concepts: PositiveInt = Field(5, description="Best concepts kept per unit.")
    tie_tolerance: float = Field(
        1e-3,
        ge=0,
        description="Concepts scoring within this of a unit's best are listed in tied_with: the label is a tie.",
    )
    top_images: PositiveInt = Field(10, description="Most activating probe images kept per unit.")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Probe images.")
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig, description="Concept set (CLIP-Dissect).")
    clip: ClipConfig = Field(default_factory=ClipConfig, description="CLIP model (CLIP-Dissect).")
    netdissect: NetDissectConfig = Field(default_factory=NetDissectConfig, description="Network Dissection.")
    final_layer_check: bool = Field(
        True,
        description=(
            "With clip_dissect: label each model's output units with its class names and report the share named "
            "after their own class (label_checks; the CLIP-Dissect paper's own evaluation)."
        ),
    )
    significance: SignificanceConfig = Field(
        default_factory=SignificanceConfig, description="p-values of the labels (neurons.p_value)."
    )


class LimeSearchConfig(_Section):
    """LIME parameter search scored by deletion AUC plus stability across two seeds."""

    enabled: bool = Field(False, description="Run the search for every image (writes lime_trials).")
    grid: list[dict[str, str | int | float]] = Field(
        [
            {"segmentation": "quickshift"},
            {"segmentation": "slic", "n_segments": 50},
            {"segmentation": "felzenszwalb", "scale": 100},
            {"segmentation": "quickshift", "num_samples": 500},
        ],
        min_length=1,
        description="Parameter sets: segmentation, its parameters, num_samples, kernel_width.",
    )
    seeds: list[int] = Field(
        [0, 1], min_length=2, max_length=2, description="The two seeds whose agreement measures stability."
    )


class AdaptiveLimeConfig(_Section):
    """Adaptive LIME: samples in rounds until the top-k superpixels settle (S-LIME's idea); num_samples caps them."""

    enabled: bool = Field(False, description="Stop drawing samples once the explanation has converged.")
    round_size: PositiveInt = Field(
        100, description="Samples per round (rounded up to whole forward batches); lime's ridge is refitted after each."
    )
    top_k: PositiveInt = Field(5, description="How many of the largest-weight superpixels must settle as a set.")
    stable_rounds: PositiveInt = Field(2, description="Consecutive refits that must give the same top-k set.")
    z: float = Field(
        1.0,
        ge=0,
        description="Standard errors of their difference by which the k-th weight must exceed the (k+1)-th.",
    )


class LimeConfig(_Section):
    """LIME (lime's explanation model, batched perturbations)."""

    segmentation: Literal["quickshift", "slic", "felzenszwalb"] = Field(
        "quickshift", description="Superpixel algorithm (quickshift with lime's defaults)."
    )
    segmentation_params: dict[str, str | int | float] = Field(
        {}, description="Parameters of the segmentation algorithm (scikit-image names)."
    )
    num_samples: PositiveInt = Field(1000, description="Perturbed samples per image (the cap with adaptive LIME).")
    hide_color: list[int] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="RGB of hidden superpixels; null: each superpixel's mean colour (lime's default).",
    )
    kernel_width: float = Field(0.25, gt=0, description="Width of LIME's exponential kernel.")
    num_features: PositiveInt = Field(
        100000, description="Superpixels kept in the ridge fit (lime's default keeps all)."
    )
    batch_size: PositiveIntOrAuto = Field(
        "auto",
        description=(
            "Perturbed images per model forward; auto: 16 on CPU in fp32, 32 with bf16/fp16 (cache-sized batches run "
            "fastest there), 256 on GPU."
        ),
    )
    search: LimeSearchConfig = Field(default_factory=LimeSearchConfig, description="Parameter search.")
    adaptive: AdaptiveLimeConfig = Field(
        default_factory=AdaptiveLimeConfig, description="Adaptive sample count (num_samples becomes the cap)."
    )


class MetricsConfig(_Section):
    """Agreement, localization and faithfulness metrics."""

    agreement_rule: Literal["top_q", "otsu"] = Field(
        "top_q", description="Binarisation for IoU: the top q of pixels, or Otsu's threshold."
    )
    agreement_q: float = Field(0.2, gt=0, lt=1, description="Share of pixels kept by the top_q rule.")
    localization: bool = Field(
        True, description="Score maps against ground-truth masks or boxes when the images have them."
    )
    faithfulness: bool = Field(True, description="Deletion and insertion AUC of every map.")
    steps: PositiveInt = Field(20, description="Deletion/insertion steps.")
    baseline: Literal["blur", "mean"] = Field(
        "blur", description="What deleted pixels become: a blurred copy or the dataset mean."
    )
    batch_size: PositiveIntOrAuto = Field(
        "auto", description="Perturbed images per forward in deletion/insertion; auto: as LIME's on CPU, 64 on GPU."
    )
    road: bool = Field(
        False,
        description=(
            "Also score CAM maps with ROAD (grad-cam's ROADCombined; one sparse solve per image and percentile, slow)."
        ),
    )
    road_percentiles: list[Annotated[int, Field(gt=0, lt=100)]] = Field(
        [20, 40, 60, 80], min_length=1, description="Percentiles of removed pixels ROAD averages over."
    )


class TopKTarget(_Section):
    """Maps for each of an image's K most probable classes."""

    topk: PositiveInt = Field(..., description="How many of the most probable classes each image's maps explain.")


def _target_setting(value: Any) -> Any:
    """One error for the whole field (pydantic would report each union member separately)."""
    if value in ("predicted", "label"):
        return value
    if isinstance(value, dict) and set(value) == {"topk"}:
        topk = value["topk"]
        if isinstance(topk, int) and not isinstance(topk, bool) and topk > 0:
            return value
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if isinstance(value, list) and value and all(isinstance(name, str) and name for name in value):
        if len(set(value)) != len(value):
            raise ValueError("class names repeat")
        return value
    raise ValueError(f"must be 'predicted', 'label', {{topk: K}} or a non-empty list of class names, got {value!r}")


TargetSetting = Annotated[Literal["predicted", "label"] | TopKTarget | list[str], BeforeValidator(_target_setting)]
"""``explain.target``: one class per image (``predicted``, ``label``) or several (``{topk: K}``, class names)."""


class ConceptAttributionConfig(_Section):
    """Concept attributions: the target class of each image split over the concepts of labelled units."""

    enabled: bool = Field(
        True,
        description=(
            "Attribute each image's target to the concepts of labelled units (needs the dissect stage: the layers of "
            "models.layers)."
        ),
    )
    layers: list[str] | None = Field(
        None,
        description="Layers to attribute at; null: every layer of models.layers that the dissect stage labelled.",
    )
    top_k: PositiveInt = Field(5, description="Concepts kept per image, labelling method, layer and target.")
    ablation: bool = Field(
        True,
        description=(
            "Check each image's top concept by zeroing its units, and as many random labelled units (one extra forward "
            "of two copies of the batch per layer and labelling method)."
        ),
    )


class SanityConfig(_Section):
    """Sanity checks of the explanation methods: do their maps change when the model's weights are randomised?"""

    enabled: bool = Field(
        False,
        description=(
            "Run the sanity checks after each model's explain chunks (writes the sanity table; cost: README, "
            "Sanity checks)."
        ),
    )
    images: PositiveInt = Field(8, description="Images checked per model: the first N of the run's image set.")
    tests: list[Literal["cascading", "smprt", "emprt", "random_logit"]] = Field(
        ["cascading", "emprt", "random_logit"],
        min_length=1,
        description=(
            "cascading: Adebayo et al.'s cascading randomisation from the output layer down; smprt: Hedstrom et al.'s "
            "smooth MPRT (bottom-up, maps averaged over noisy inputs); emprt: their efficient MPRT (relative rise of "
            "the map's entropy, trained vs fully randomised model); random_logit: the map of a random other class."
        ),
    )
    granularity: Literal["blocks", "modules"] = Field(
        "blocks",
        description=(
            "What one randomisation step resets: a block (a child of the model, containers such as nn.Sequential "
            "opened; ResNet18: 11 steps) or every module with parameters (Quantus' steps; ResNet18: 62)."
        ),
    )
    methods: list[str] | None = Field(
        None, description="Methods checked (a subset of explain.methods); null: every configured method."
    )
    smprt_samples: PositiveInt = Field(
        10, description="smprt: noisy copies of each image averaged per map (Quantus' default: 50)."
    )
    smprt_noise: float = Field(
        0.1, gt=0, description="smprt: noise std as a share of each input's value range (Quantus' default)."
    )
    emprt_bins: PositiveInt = Field(100, description="emprt: histogram bins of the map's discrete entropy (Quantus').")


class ExplainConfig(_Section):
    """Per-image explanations."""

    enabled: bool = Field(True, description="Run the explain stage.")
    methods: list[str] = Field(
        ["gradcam", "scorecam", "ablationcam", "lime"],
        min_length=1,
        description="Explanation methods by registered name (README, Registered names).",
    )
    chunk_size: PositiveInt = Field(
        16, description="Images per work unit (one Prefect task, one Parquet file per table)."
    )
    batch_size: PositiveInt = Field(16, description="Images per model forward.")
    topk: PositiveInt = Field(5, description="Classes kept per image in the predictions table.")
    target: TargetSetting = Field(
        "predicted",
        description=(
            "Classes each image's maps explain: 'predicted' (the top-1 class), 'label' (the image's label), "
            "{topk: K} (each of the K most probable classes) or a list of class names (each of them); "
            "tables key every map and metric by its target."
        ),
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Autocast precision of model forwards (see benchmarks/RESULTS.md for its accuracy impact); auto: bf16 "
            "where the hardware computes in it (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16), fp32 elsewhere, "
            "AblationCAM fp32 on CPUs, XGradCAM fp32 everywhere; the runs table records what it resolved to."
        ),
    )
    scorecam_batch_size: PositiveIntOrAuto = Field(
        "auto",
        description="Masked images per forward in ScoreCAM (grad-cam uses 16); auto: as LIME's on CPU, 64 on GPU.",
    )
    ablationcam_batch_size: PositiveInt = Field(
        128, description="Ablated channels per forward in AblationCAM (grad-cam uses 32; 128 is ~4x faster on CPU)."
    )
    scorecam_channels: PositiveInt | None = Field(
        None,
        description=(
            "ScoreCAM on a channel budget: score only the K channels of largest activation variance (Faster "
            "Score-CAM), the rest weigh 0; null: every channel (exact ScoreCAM)."
        ),
    )
    groupcam_groups: PositiveInt = Field(
        32, description="Group-CAM: channel groups, one masked forward each (paper: 32)."
    )
    lime: LimeConfig = Field(default_factory=LimeConfig, description="LIME.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics.")
    concepts: ConceptAttributionConfig = Field(
        default_factory=ConceptAttributionConfig, description="Concept attributions."
    )
    sanity: SanityConfig = Field(default_factory=SanityConfig, description="Sanity checks (model randomisation).")

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("methods repeat")
        return value

    @model_validator(mode="after")
    def _sanity_methods_are_configured(self) -> ExplainConfig:
        unknown = sorted(set(self.sanity.methods or ()) - set(self.methods))
        if unknown:
            raise ValueError(f"sanity.methods {unknown} are not among explain.methods {self.methods}")
        return self


class RunnerConfig(_Section):
    """How Prefect executes tasks: threads in this process, or a Dask cluster (one per flow run)."""

    kind: Literal["thread", "dask"] = Field(
        "thread", description="Threads in the flow's process, or prefect-dask's DaskTaskRunner."
    )
    workers: PositiveInt = Field(1, description="Tasks run at once by the thread-pool task runner (thread kind).")
    address: str | None = Field(
        None,
        description=(
            "Scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786 (dask kind); unset: a LocalCluster per "
            "flow run."
        ),
    )
    n_workers: PositiveInt = Field(2, description="Worker processes of the LocalCluster (dask kind without address).")
    threads_per_worker: PositiveInt = Field(1, description="Threads per LocalCluster worker process.")
    worker_resources: dict[str, float] = Field(
        {}, description="Dask resources each LocalCluster worker advertises, e.g. {GPU: 1}."
    )

    @model_validator(mode="after")
    def _dask_fields(self) -> RunnerConfig:
        if self.kind != "dask" and self.address is not None:
            raise ValueError("address needs kind 'dask'")
        return self


class AuditConfig(_Section):
    """A whole audit: models, images, stages."""

    name: str = Field("audit", min_length=1, description="Config name: runs of the same name are compared and resumed.")
    seed: int = Field(0, description="Seed for every random choice of the run.")
    results: str | None = Field(
        None, description="Results root (local folder or fsspec URL); CLI --results or ./results when unset."
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="Torch device: auto picks CUDA when present."
    )
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name="demo-resnet18")], min_length=1, description="Models to audit."
    )
    images: ImageSetConfig = Field(default_factory=ImageSetConfig, description="Images to explain.")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="The synthetic world (demo model, world image sets)."
    )
    dissect: DissectConfig = Field(default_factory=DissectConfig, description="Neuron labelling stage.")
    explain: ExplainConfig = Field(default_factory=ExplainConfig, description="Explanation stage.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Task execution.")

    @model_validator(mode="after")
    def _unique_model_names(self) -> AuditConfig:
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        return self

    def model(self, name: str) -> ModelConfig:
        """The configured model called ``name`` (names are unique; KeyError when none is)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model named {name!r} in the config")

    def config_hash(self) -> str:
        """Stable hash of what decides the results: the validated config without ``runner``, so a
        run started on threads can be resumed on a Dask cluster and vice versa."""
        results_json = json.dumps(self.model_dump(mode="json", exclude={"runner"}), sort_keys=True)
        return hashlib.sha256(results_json.encode()).hexdigest()[:16]

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


# Fields holding paths that must exist, relative to the config file's folder when relative.
_EXISTING_PATHS = {
    ("dissect", "probe", "root"),
    ("dissect", "concepts", "path"),
    ("models", "*", "path"),
    ("models", "*", "class_names"),
    ("images", "root"),
    ("images", "list_file"),
}


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(root)"


def _resolve_paths(data: dict[str, Any], base: Path) -> list[tuple[str, str]]:
    """Make relative path fields absolute against ``base`` and report those that do not exist."""
    problems: list[tuple[str, str]] = []

    def visit(node: Any, pattern: tuple[str, ...], loc: tuple[str, ...]) -> None:
        if not pattern:
            return
        head, rest = pattern[0], pattern[1:]
        if head == "*" and isinstance(node, list):
            for index, item in enumerate(node):
                visit(item, rest, loc + (str(index),))
        elif isinstance(node, dict) and head in node:
            if rest:
                visit(node[head], rest, loc + (head,))
            elif isinstance(node[head], str) and "://" not in node[head]:
                path = Path(node[head]).expanduser()
                path = path if path.is_absolute() else base / path
                node[head] = str(path)
                if not path.exists():
                    problems.append((_location(loc + (head,)), f"file or folder not found: {path}"))

    for pattern in _EXISTING_PATHS:
        visit(data, pattern, ())
    return problems


def _callable_entries(data: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """The mappings holding a ``callable`` (model entries, the image set) with their field paths."""
    models = data.get("models")
    for index, model in enumerate(models if isinstance(models, list) else []):
        if isinstance(model, dict):
            yield model, f"models.{index}"
    if isinstance(data.get("images"), dict):
        yield data["images"], "images"


def _resolve_callable_files(data: dict[str, Any], base: Path, confine: bool) -> list[tuple[str, str]]:
    """Make the file of each ``file.py:attr`` callable absolute against ``base``; report a missing file and,
    when ``confine``, one outside the config's folder and the current directory (a config runs no code
    from elsewhere on the machine)."""
    problems: list[tuple[str, str]] = []
    roots = [Path(os.path.realpath(base)), Path(os.path.realpath(Path.cwd()))]
    for entry, where in _callable_entries(data):
        target = entry.get("callable")
        if not isinstance(target, str) or not names_file(target):
            continue
        location, attr = split_target(target)
        path = Path(location).expanduser()
        path = path if path.is_absolute() else base / path
        entry["callable"] = f"{path}:{attr}"
        real = Path(os.path.realpath(path))
        if not real.is_file():
            problems.append((f"{where}.callable", f"file not found: {path} (relative to the config's folder)"))
        elif confine and not any(real.is_relative_to(root) for root in roots):
            problems.append(
                (
                    f"{where}.callable",
                    f"{real} lies outside the config's folder {roots[0]} and the current directory; "
                    "put the file beside the config (or install it as a package and name package.module:function)",
                )
            )
    return problems


def parse_config(data: Any, base: Path | None = None) -> AuditConfig:
    """Validate a config mapping; raise :class:`ConfigErrors` listing every problem with its path.

    ``base`` is the config file's folder: relative paths start there, and a callable's file must lie
    under it or the current directory. Without it (a stored, already validated config) paths start at
    the current directory and are not confined."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigErrors([("(root)", f"expected a mapping of options, got {type(data).__name__}")])
    data = json.loads(json.dumps(data, default=str))
    problems = _resolve_paths(data, base or Path.cwd())
    problems += _resolve_callable_files(data, base or Path.cwd(), confine=base is not None)
    try:
        config = AuditConfig.model_validate(data)
    except ValidationError as error:
        problems += [(_location(item["loc"]), item["msg"]) for item in error.errors()]
        config = None
    if problems:
        raise ConfigErrors(sorted(set(problems)))
    return config


def load_config(path: str | Path) -> AuditConfig:
    """Read and validate a YAML config file (``yaml.safe_load``; relative paths from its folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigErrors([("(file)", f"cannot read {path}: {error}")]) from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigErrors([("(file)", f"{path} is not valid YAML: {error}")]) from error
    return parse_config(data, base=path.resolve().parent)
