"""Neuron labelling of one model: CLIP-Dissect per layer and Network Dissection, as table rows.

The pure functions take loaded models and tensors; the ``@task`` wrappers resolve the config,
reuse the process's loaded models and cached features, and write one ``neurons`` file per
(model, layer, method) work unit.
"""
from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from flows.config import AuditConfig
from storage.parquet import ResultsStore, safe_name
from tasks.probe import Probe, dissect_batches, open_probe, pixel_batches
from tasks.runtime import resolve_device, using_model

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def neurons_unit(model: str, layer: str, method: str) -> str:
    """The deterministic work-unit name of one (model, layer, method) labelling."""
    return f"{safe_name(model)}-{safe_name(layer)}-{method}"


def netdissect_errors_unit(model: str, layers: list[str]) -> str:
    """The ``errors`` unit of one Network Dissection pass over ``layers``.

    A resume dissects only the layers still missing: naming the unit by its layer set keeps the
    earlier pass's rows, while re-running the same layers replaces its own file (no duplicates).
    """
    digest = hashlib.sha256("\n".join(layers).encode()).hexdigest()[:12]
    return f"{safe_name(model)}-netdissect-{digest}"


def model_layers(model, layers: list[str] | None) -> list[str]:
    """The layers to label: the configured ones (checked), else ResNet's stages, else the CAM layer."""
    from tasks.models import default_cam_layer, resolve_layer

    if layers:
        for name in layers:
            resolve_layer(model.module, name, field="models.layers")
        return list(layers)
    stages = [name for name in RESNET_STAGES if name in model.layer_names]
    return stages or [default_cam_layer(model.module, model.input_size)]


def concept_set(config: AuditConfig, probe: Probe, class_names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The configured concepts and, where known, each concept's category."""
    from tasks.clip_dissect import broden_concept_categories, concepts_from_broden_labels, load_concepts

    settings = config.dissect.concepts
    if settings.source == "world":
        from tasks.synthetic import world_concepts

        pairs = world_concepts()
        return [name for name, _ in pairs], dict(pairs)
    if settings.source == "broden":
        label_csv = Path(probe.root) / "label.csv"
        return concepts_from_broden_labels(label_csv, settings.categories), broden_concept_categories(label_csv)
    if settings.source == "file":
        return load_concepts(settings.path, field="dissect.concepts.path"), {}
    return load_concepts(class_names, field="dissect.concepts"), {}


_clip_lock = threading.Lock()


@lru_cache(maxsize=2)
def _load_clip(name: str, pretrained: str | None, device: str):
    import open_clip

    from tasks.clip_dissect import clip_identity

    if name == "xai-toy-clip":
        from tasks.toy_clip import register_toy_clip

        register_toy_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name), clip_identity(name, pretrained)


def clip_model(config: AuditConfig):
    """(model, preprocess, tokenizer, identity) of the configured CLIP, loaded once per process."""
    settings = config.dissect.clip
    pretrained = settings.pretrained
    if pretrained is None and settings.model == "xai-toy-clip":
        from tasks.runtime import world_spec
        from tasks.toy_clip import ensure_toy_clip

        pretrained = str(ensure_toy_clip(world_spec(config)))
    with _clip_lock:
        return _load_clip(settings.model, pretrained, str(resolve_device(config.device)))


def clip_similarity(config: AuditConfig, probe: Probe, concepts: list[str]) -> torch.Tensor:
    """The probe-image × concept CLIP matrix (features cached per CLIP, probe set and concept set)."""
    from tasks.clip_dissect import cached_clip_image_features, cached_clip_text_features, image_concept_matrix

    settings = config.dissect.clip
    model, preprocess, tokenizer, identity = clip_model(config)
    device = resolve_device(config.device)
    image_feats = cached_clip_image_features(
        model, preprocess, lambda: pixel_batches(probe, preprocess, settings.batch_size, config.dissect.probe.workers),
        clip_identity=identity, probe_identity=probe.identity, device=device, batch_size=settings.batch_size)
    text_feats = cached_clip_text_features(model, tokenizer, concepts, clip_identity=identity, template=settings.template, device=device)
    return image_concept_matrix(image_feats, text_feats)


def pooled_layer_activations(config: AuditConfig, model, layers: list[str], probe: Probe) -> dict[str, torch.Tensor]:
    """Pooled activations of every layer, one pass over the probe set, cached on disk."""
    from tasks.activations import cached_pooled_activations

    settings = config.dissect.probe
    return cached_pooled_activations(
        model.module, layers, lambda: pixel_batches(probe, model.preprocess, settings.batch_size, settings.workers),
        model_identity=model.identity, probe_identity=probe.identity, pooling=config.dissect.pooling,
        device=resolve_device(config.device))


def clip_dissect_rows(config: AuditConfig, similarity_matrix: torch.Tensor, activations: torch.Tensor, probe: Probe,
                      concepts: list[str], categories: dict[str, str]) -> pd.DataFrame:
    """CLIP-Dissect labels of one layer's units."""
    from tasks.clip_dissect import compute_similarity, label_units

    scores = compute_similarity(config.dissect.clip.similarity, similarity_matrix, activations,
                                device=resolve_device(config.device))
    return label_units(scores, concepts, activations, probe.image_ids, top_k=config.dissect.top_concepts,
                       top_images=config.dissect.top_images, concept_category=categories)


def netdissect_rows(config: AuditConfig, model, layers: list[str], probe: Probe,
                    nonfinite: dict[str, None] | None = None) -> dict[str, pd.DataFrame]:
    """Network Dissection labels of several layers, sharing each pass over the probe set; images
    with NaN/Inf activations are left out and named in ``nonfinite``."""
    from tasks.activations import read_cached_tensor, write_tensor_atomic
    from tasks.netdissect import dissect_layers

    settings, probe_settings = config.dissect.netdissect, config.dissect.probe
    broden = probe.broden()
    device = resolve_device(config.device)
    # a model without a content identity (a test double) cannot key a cache: its thresholds are computed
    files = threshold_files(model, probe, layers, settings.quantile, device) if getattr(model, "identity", None) else {}
    cached = {layer: read_cached_tensor(path) for layer, path in files.items()}
    thresholds = cached if files and all(value is not None for value in cached.values()) else None
    frames = dissect_layers(
        lambda: dissect_batches(probe, model.preprocess, model.module, layers, probe_settings.batch_size, device,
                                workers=probe_settings.workers, nonfinite=nonfinite),
        broden.label_names, broden.label_category, thresholds=thresholds, quantile=settings.quantile,
        iou_threshold=settings.iou_threshold, categories=settings.categories, top_k=config.dissect.top_concepts,
        top_images=config.dissect.top_images, device=device)
    if files and thresholds is None:
        for layer, frame in frames.items():
            write_tensor_atomic(torch.tensor(frame["threshold"].to_numpy(dtype="float32")), files[layer])
    return frames


THRESHOLDS_VERSION = 1  # bump when the threshold estimate changes: it keys the cache


def threshold_files(model, probe: Probe, layers: list[str], quantile: float, device: torch.device) -> dict[str, Path]:
    """Where each layer's Network Dissection thresholds are cached.

    The thresholds (the first pass over the probe set) depend only on the weights, the
    preprocessing, the probe images, the quantile and the device's arithmetic; caching them lets
    a warm run skip that pass (the IoU pass reproduces the same rows from the same float32 values).
    """
    from tasks.cache import cache_dir, content_key
    from tasks.netdissect import DEFAULT_BINS

    folder = cache_dir("netdissect_thresholds", model=model.identity, preprocess=repr(model.preprocess), probe=probe.identity,
                       quantile=quantile, bins=DEFAULT_BINS, device=device.type, version=THRESHOLDS_VERSION)
    return {layer: folder / f"{content_key(layer=layer)}.safetensors" for layer in layers}


def finite_clip_dissect_rows(config: AuditConfig, similarity_matrix: torch.Tensor, activations: torch.Tensor, probe: Probe,
                             concepts: list[str], categories: dict[str, str], model_name: str, layer: str) -> tuple[pd.DataFrame, list[dict]]:
    """:func:`clip_dissect_rows` without NaN/Inf activations, and the ``errors`` rows naming each
    probe image left out and each unit left unlabelled because of them."""
    from dataclasses import replace

    from tasks.activations import finite_selection

    images, units = finite_selection(activations)
    errors = [{"stage": "dissect", "item_id": f"{model_name}/{layer}/unit {unit}", "error_type": "NonFiniteActivationError", "model": model_name,
               "message": f"unit {unit} of {layer} has no finite activation on any probe image; it is not labelled"}
              for unit in torch.nonzero(~units).flatten().tolist()]
    errors += [{"stage": "dissect", "item_id": probe.image_ids[index], "error_type": "NonFiniteActivationError", "model": model_name,
                "message": f"NaN/Inf activations in {layer}; image left out of CLIP-Dissect for this layer"}
               for index in torch.nonzero(~images).flatten().tolist()]
    if errors:
        kept = torch.nonzero(images).flatten().tolist()
        probe = replace(probe, image_ids=[probe.image_ids[i] for i in kept], paths=[probe.paths[i] for i in kept])
        similarity_matrix, activations = similarity_matrix[images.to(similarity_matrix.device)], activations[images][:, units]
    frame = clip_dissect_rows(config, similarity_matrix, activations, probe, concepts, categories)
    frame["unit"] = torch.nonzero(units).flatten().cpu().numpy()[frame["unit"].to_numpy()]  # back to the layer's own unit numbers
    return frame, errors


def _write_neurons(store: ResultsStore, run_id: str, model_name: str, layer: str, method: str, frame: pd.DataFrame) -> int:
    frame = frame.assign(model=model_name, layer=layer, method=method)
    columns = [column for column in frame.columns if column in store_columns()]
    store.write("neurons", run_id, neurons_unit(model_name, layer, method), frame[columns])
    return len(frame)


def store_columns() -> list[str]:
    from storage.schemas import TABLES

    return TABLES["neurons"].names


def _model_config(config: AuditConfig, model_name: str):
    return next(model for model in config.models if model.name == model_name)


@task(name="dissect-layers", task_run_name="resolve layers of {model_name}")
def layers_task(config: AuditConfig, model_name: str) -> list[str]:
    """The layers of ``model_name`` to label (checked against the model)."""
    model_config = _model_config(config, model_name)
    with using_model(config, model_config) as model:
        return model_layers(model, model_config.layers)


@task(name="clip-dissect", task_run_name="clip-dissect {model_name} {layer}", tags=["gpu"],
      retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def clip_dissect_task(config: AuditConfig, model_name: str, layers: list[str], layer: str, results: str, run_id: str) -> int:
    """Label one layer's units with CLIP-Dissect and write its ``neurons`` file; returns the row count."""
    probe = open_probe(config)
    model_config = _model_config(config, model_name)
    with using_model(config, model_config) as model:
        activations = pooled_layer_activations(config, model, layers, probe)[layer]
        concepts, categories = concept_set(config, probe, model.class_names)
    frame, errors = finite_clip_dissect_rows(config, clip_similarity(config, probe, concepts), activations, probe, concepts, categories,
                                             model_name, layer)
    store = ResultsStore(results)
    store.write("errors", run_id, neurons_unit(model_name, layer, "clip_dissect"), errors)  # before neurons: that file marks the unit done
    return _write_neurons(store, run_id, model_name, layer, "clip_dissect", frame)


@task(name="netdissect", task_run_name="netdissect {model_name}", tags=["gpu"],
      retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def netdissect_task(config: AuditConfig, model_name: str, layers: list[str], results: str, run_id: str) -> int:
    """Network Dissection of ``layers`` (one set of passes), one ``neurons`` file per layer."""
    probe = open_probe(config)
    model_config = _model_config(config, model_name)
    nonfinite: dict[str, None] = {}
    with using_model(config, model_config) as model:
        frames = netdissect_rows(config, model, layers, probe, nonfinite)
    store = ResultsStore(results)
    store.write("errors", run_id, netdissect_errors_unit(model_name, layers), [
        {"stage": "dissect", "item_id": image_id, "error_type": "NonFiniteActivationError", "model": model_name,
         "message": f"NaN/Inf activations in {', '.join(layers)}; image left out of Network Dissection"} for image_id in nonfinite])
    rows = sum(_write_neurons(store, run_id, model_name, layer, "netdissect", frame) for layer, frame in frames.items())
    get_run_logger().info("netdissect %s: %d units over %d layers", model_name, rows, len(frames))
    return rows


@task(name="probe-set", task_run_name="probe set")
def probe_task(config: AuditConfig, results: str, run_id: str) -> int:
    """List and check the probe set once; its unusable images become ``errors`` rows."""
    probe = open_probe(config)
    ResultsStore(results).write("errors", run_id, "probe", probe.errors)
    return len(probe.image_ids)
