"""Neuron labelling of one model as table rows: the config-aware glue around CLIP-Dissect and
Network Dissection (concept sets, the CLIP model, cached activations and thresholds).

The Prefect wrappers in :mod:`xai_audit.tasks.dissect.tasks` reuse the process's loaded models and write
one ``neurons`` file per (model, layer, method) work unit; the labellers of
:mod:`xai_audit.tasks.dissect.labellers` call these functions.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from xai_audit.storage.parquet import ResultsStore, safe_name
from xai_audit.storage.schemas import TABLES
from xai_audit.tasks.compute.device import resolve_device
from xai_audit.tasks.core.cache import cache_dir, content_key
from xai_audit.tasks.core.config import AuditConfig, NetDissectConfig
from xai_audit.tasks.core.errors import ConfigError, ItemError
from xai_audit.tasks.core.progress import track
from xai_audit.tasks.core.rows import error_row
from xai_audit.tasks.data.models import default_cam_layer, resolve_layer
from xai_audit.tasks.dissect.activations import (
    cached_pooled_activations,
    finite_selection,
    read_cached_tensor,
    write_tensor_atomic,
)
from xai_audit.tasks.dissect.clip_dissect import (
    broden_concept_categories,
    cached_clip_image_features,
    cached_clip_text_features,
    clip_identity,
    compute_similarity,
    concepts_from_broden_labels,
    image_concept_matrix,
    label_units,
    load_concepts,
    similarity_function,
)
from xai_audit.tasks.dissect.clip_weights import TOY_CLIP, ClipWeights, resolve_clip_weights
from xai_audit.tasks.dissect.label_checks import CHECK_FINAL_LAYER, final_layer_rows, output_layer
from xai_audit.tasks.dissect.netdissect import DEFAULT_BINS, dissect_layers
from xai_audit.tasks.dissect.probe import Probe, dissect_batches, pixel_batches
from xai_audit.tasks.dissect.significance import clip_dissect_p_values
from xai_audit.tasks.world.synthetic import world_concepts
from xai_audit.tasks.world.toy_clip import ensure_toy_clip, register_toy_clip

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def neurons_unit(model: str, layer: str, method: str) -> str:
    """The deterministic work-unit name of one (model, layer, method) labelling."""
    return f"{safe_name(model)}-{safe_name(layer)}-{method}"


def label_checks_unit(model: str) -> str:
    """The deterministic work-unit name of one model's label self-tests."""
    return f"{safe_name(model)}-{CHECK_FINAL_LAYER}"


def labelling_errors_unit(model: str, method: str, layers: list[str]) -> str:
    """The ``errors`` unit of one labelling pass of ``method`` over ``layers``.

    One layer's pass shares its ``neurons`` unit's name. A pass over several layers is named by
    its layer set: a resume labels only the layers still missing, so the earlier pass's rows are
    kept, while re-running the same layers replaces its own file (no duplicates).
    """
    if len(layers) == 1:
        return neurons_unit(model, layers[0], method)
    digest = hashlib.sha256("\n".join(layers).encode()).hexdigest()[:12]
    return f"{safe_name(model)}-{method}-{digest}"


def model_layers(model, layers: list[str] | None) -> list[str]:
    """The layers to label: the configured ones (checked), else ResNet's stages, else the CAM layer."""
    if layers:
        for name in layers:
            resolve_layer(model.module, name, field="models.layers")
        return list(layers)
    stages = [name for name in RESNET_STAGES if name in model.layer_names]
    return stages or [default_cam_layer(model.module, model.input_size)]


def concept_set(config: AuditConfig, probe: Probe, class_names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The configured concepts and, where known, each concept's category."""
    settings = config.dissect.concepts
    if settings.source == "world":
        pairs = world_concepts()
        return [name for name, _ in pairs], dict(pairs)
    if settings.source == "broden":
        label_csv = Path(probe.root) / "label.csv"
        return concepts_from_broden_labels(label_csv, settings.categories), broden_concept_categories(label_csv)
    if settings.source == "file":
        return load_concepts(settings.path, field="dissect.concepts.path"), {}
    return load_concepts(class_names, field="dissect.concepts"), {}


def label_sources(config: AuditConfig, probe: Probe, method: str, concepts: int) -> dict[str, object]:
    """What every ``neurons`` row of ``method`` names its label's origin with: the probe set the label
    was chosen on, its size, and the candidate set (the configured concepts, or the probe's masks)."""
    settings = config.dissect
    where = "world" if settings.probe.kind == "world" else Path(probe.root).name
    if method == "netdissect":
        concept_set = "probe masks"
    elif settings.concepts.source == "file":
        concept_set = f"file {Path(settings.concepts.path).name}"
    elif settings.concepts.source == "classes":
        concept_set = "class names"
    else:
        concept_set = settings.concepts.source
    return {
        "probe_set": f"{where} {probe.split or 'all'}",
        "probe_images": len(probe.image_ids),
        "concept_set": concept_set,
        "concepts": concepts,
    }


_clip_lock = threading.Lock()


@lru_cache(maxsize=2)
def _load_clip(weights: ClipWeights, device: str, name: str, pretrained: str | None):
    import open_clip  # seconds to import; only CLIP-Dissect needs it

    if weights.model == TOY_CLIP:
        register_toy_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(
        weights.model, device=device, **weights.open_clip_kwargs()
    )
    model.eval()
    # the configured name and tag (or file) key the caches, not where this machine keeps the file
    return model, preprocess, open_clip.get_tokenizer(weights.model), clip_identity(name, pretrained)


def clip_model(config: AuditConfig):
    """(model, preprocess, tokenizer, identity) of the configured CLIP, loaded once per process from
    the local file its settings resolve to (never downloaded: preflight refused a missing one)."""
    settings = config.dissect.clip
    pretrained = settings.pretrained
    if pretrained is None and settings.model == TOY_CLIP:
        pretrained = str(ensure_toy_clip(config.world))
    weights = resolve_clip_weights(settings.model, pretrained)
    with _clip_lock:
        return _load_clip(weights, str(resolve_device(config.device)), settings.model, pretrained)


def clip_similarity(config: AuditConfig, probe: Probe, concepts: list[str]) -> torch.Tensor:
    """The probe-image × concept CLIP matrix (features cached per CLIP, probe set and concept set)."""
    settings = config.dissect.clip
    model, preprocess, tokenizer, identity = clip_model(config)
    device = resolve_device(config.device)
    image_feats = cached_clip_image_features(
        model,
        preprocess,
        lambda: pixel_batches(probe, preprocess, settings.batch_size, config.dissect.probe.workers),
        clip_identity=identity,
        probe_identity=probe.identity,
        device=device,
        batch_size=settings.batch_size,
        progress=True,
    )
    text_feats = cached_clip_text_features(
        model, tokenizer, concepts, clip_identity=identity, template=settings.template, device=device
    )
    return image_concept_matrix(image_feats, text_feats)


def pooled_layer_activations(config: AuditConfig, model, layers: list[str], probe: Probe) -> dict[str, torch.Tensor]:
    """Pooled activations of every layer, one pass over the probe set, cached on disk."""
    settings = config.dissect.probe
    return cached_pooled_activations(
        model.module,
        layers,
        lambda: pixel_batches(probe, model.preprocess, settings.batch_size, settings.workers),
        model_identity=model.identity,
        probe_identity=probe.identity,
        pooling=config.dissect.pooling,
        device=resolve_device(config.device),
        progress=True,
    )


def clip_dissect_pass_layers(config: AuditConfig, model, layers: list[str]) -> list[str]:
    """The layers of CLIP-Dissect's one activation pass over the probe set: ``layers`` plus, when
    the final-layer check runs, the output layer. The pass stops after its deepest layer, so the
    output layer costs a pooling and a linear layer, and the check reads its activations from
    this pass's cache instead of taking a whole pass of its own."""
    if not config.dissect.final_layer_check:
        return list(layers)
    try:
        return list(dict.fromkeys([*layers, output_layer(model.module, len(model.class_names))]))
    except ConfigError:  # no output layer: the check does not apply (label_check_task says so)
        return list(layers)


def clip_dissect_rows(
    config: AuditConfig,
    similarity_matrix: torch.Tensor,
    activations: torch.Tensor,
    probe: Probe,
    concepts: list[str],
    categories: dict[str, str],
) -> pd.DataFrame:
    """CLIP-Dissect labels of one layer's units, with permutation p-values when configured."""
    device = resolve_device(config.device)
    scores = compute_similarity(config.dissect.clip.similarity, similarity_matrix, activations, device=device)
    frame = label_units(
        scores,
        concepts,
        activations,
        probe.image_ids,
        top_k=config.dissect.top_concepts,
        top_images=config.dissect.top_images,
        concept_category=categories,
        tie_tolerance=config.dissect.tie_tolerance,
    )
    count = config.dissect.significance.permutations
    if count:
        similarity = similarity_function(config.dissect.clip.similarity)
        frame["p_value"] = clip_dissect_p_values(
            similarity, similarity_matrix, activations, count=count, seed=config.seed, device=device
        ).numpy()
    return frame


def final_layer_check_rows(config: AuditConfig, model, probe: Probe, layers: list[str] = ()) -> pd.DataFrame:
    """``label_checks`` rows of the final-layer self-test (:mod:`xai_audit.tasks.dissect.label_checks`) of
    ``model``: CLIP-Dissect on its output units with the class names as concepts and, unless that
    is the configured concept set, with the configured one too. ``layers`` are the layers
    CLIP-Dissect labels: whichever of the check and the labelling runs first takes the one pass
    over the probe set for all of them (:func:`clip_dissect_pass_layers`)."""
    layer = output_layer(model.module, len(model.class_names))
    activations = pooled_layer_activations(config, model, [*layers, layer], probe)[layer]
    images, _ = finite_selection(activations)
    settings, device = config.dissect.clip, resolve_device(config.device)
    clip, _, tokenizer, identity = clip_model(config)

    def text(concepts: list[str]) -> torch.Tensor:
        return cached_clip_text_features(
            clip, tokenizer, concepts, clip_identity=identity, template=settings.template, device=device
        )

    sets = {"classes": list(model.class_names)}
    if config.dissect.concepts.source != "classes":
        sets[config.dissect.concepts.source] = concept_set(config, probe, model.class_names)[0]
    frames = []
    for name, concepts in sets.items():
        similarity = clip_similarity(config, probe, concepts)[images]
        scores = compute_similarity(settings.similarity, similarity, activations[images], device=device)
        frame = final_layer_rows(
            scores, concepts, model.class_names, text(concepts), text(sets["classes"]), config.dissect.tie_tolerance
        )
        frames.append(
            frame.assign(check=CHECK_FINAL_LAYER, layer=layer, concept_set=name, similarity=settings.similarity)
        )
    return pd.concat(frames, ignore_index=True)


def netdissect_rows(
    config: AuditConfig, model, layers: list[str], probe: Probe, nonfinite: dict[str, None] | None = None
) -> dict[str, pd.DataFrame]:
    """Network Dissection labels of several layers, sharing each pass over the probe set; images
    with NaN/Inf activations are left out and named in ``nonfinite``."""

    settings, probe_settings = config.dissect.netdissect, config.dissect.probe
    broden = probe.broden()
    device = resolve_device(config.device)
    # a model without a content identity (a test double) cannot key a cache: its thresholds are computed
    files = threshold_files(model, probe, layers, settings, device) if getattr(model, "identity", None) else {}
    cached = {layer: read_cached_tensor(path) for layer, path in files.items()}
    thresholds = cached if files and all(value is not None for value in cached.values()) else None
    passes = itertools.count(1)  # numbers the passes over the probe set in the progress lines
    frames = dissect_layers(
        lambda: track(
            dissect_batches(
                probe,
                model.preprocess,
                model.module,
                layers,
                probe_settings.batch_size,
                device,
                workers=probe_settings.workers,
                nonfinite=nonfinite,
            ),
            f"Network Dissection of {getattr(model, 'name', 'the model')}, pass {next(passes)} over the probe set",
            total=math.ceil(len(probe.image_ids) / probe_settings.batch_size),
        ),
        broden.label_names,
        broden.label_category,
        thresholds=thresholds,
        quantile=settings.quantile,
        iou_threshold=settings.iou_threshold,
        threshold=settings.threshold,
        categories=settings.categories,
        top_k=config.dissect.top_concepts,
        top_images=config.dissect.top_images,
        tie_tolerance=config.dissect.tie_tolerance,
        device=device,
        permutations=config.dissect.significance.permutations,
        seed=config.seed,
    )
    if files and thresholds is None:
        for layer, frame in frames.items():
            write_tensor_atomic(torch.tensor(frame["threshold"].to_numpy(dtype="float32")), files[layer])
    return frames


THRESHOLDS_VERSION = 2  # bump when the threshold estimate changes: it keys the cache


def threshold_files(
    model, probe: Probe, layers: list[str], settings: NetDissectConfig, device: torch.device
) -> dict[str, Path]:
    """Where each layer's Network Dissection thresholds are cached.

    The thresholds (the first passes over the probe set) depend only on the weights, the
    preprocessing, the probe images, the quantile, the threshold method and the device's
    arithmetic; caching them lets a warm run skip those passes (the IoU pass reproduces the same
    rows from the same float32 values).
    """

    folder = cache_dir(
        "netdissect_thresholds",
        model=model.identity,
        preprocess=repr(model.preprocess),
        probe=probe.identity,
        quantile=settings.quantile,
        threshold=settings.threshold,
        bins=DEFAULT_BINS,
        device=device.type,
        version=THRESHOLDS_VERSION,
    )
    return {layer: folder / f"{content_key(layer=layer)}.safetensors" for layer in layers}


def finite_clip_dissect_rows(
    config: AuditConfig,
    similarity_matrix: torch.Tensor,
    activations: torch.Tensor,
    probe: Probe,
    concepts: list[str],
    categories: dict[str, str],
    model_name: str,
    layer: str,
) -> tuple[pd.DataFrame, list[dict]]:
    """:func:`clip_dissect_rows` without NaN/Inf activations, and the ``errors`` rows naming each
    probe image left out and each unit left unlabelled because of them."""
    images, units = finite_selection(activations)
    errors = [
        nonfinite_activation_row(
            model_name,
            f"{model_name}/{layer}/unit {unit}",
            f"unit {unit} of {layer} has no finite activation on any probe image; it is not labelled",
        )
        for unit in torch.nonzero(~units).flatten().tolist()
    ]
    errors += [
        nonfinite_activation_row(
            model_name,
            probe.image_ids[index],
            f"NaN/Inf activations in {layer}; image left out of CLIP-Dissect for this layer",
        )
        for index in torch.nonzero(~images).flatten().tolist()
    ]
    if errors:
        kept = torch.nonzero(images).flatten().tolist()
        probe = replace(probe, image_ids=[probe.image_ids[i] for i in kept], paths=[probe.paths[i] for i in kept])
        similarity_matrix, activations = (
            similarity_matrix[images.to(similarity_matrix.device)],
            activations[images][:, units],
        )
    frame = clip_dissect_rows(config, similarity_matrix, activations, probe, concepts, categories)
    frame["unit"] = (
        torch.nonzero(units).flatten().cpu().numpy()[frame["unit"].to_numpy()]
    )  # back to the layer's own unit numbers
    return frame, errors


def nonfinite_activation_row(model_name: str, item_id: str, message: str) -> dict:
    """The ``errors`` row of a probe image or unit left out because its activations are NaN/Inf."""
    return error_row("dissect", model_name, ItemError(item_id, message, "NonFiniteActivationError"))


def write_neurons(
    store: ResultsStore, run_id: str, model_name: str, layer: str, method: str, frame: pd.DataFrame
) -> int:
    """Write one (model, layer, method) unit of ``neurons`` (only the table's columns); returns its row count."""
    frame = frame.assign(model=model_name, layer=layer, method=method)
    columns = [column for column in frame.columns if column in TABLES["neurons"].names]
    store.write("neurons", run_id, neurons_unit(model_name, layer, method), frame[columns])
    return len(frame)
