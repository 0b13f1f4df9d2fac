"""Checks that need more than the schema (architectures, weights in the caches, layer names, a
model's output width, decodable images, the probe set a model may be labelled on), run by
``validate`` and before a run starts Prefect, so a bad config costs seconds, not a failed night.

Models with published architectures are built on PyTorch's ``meta`` device: names are checked
without allocating or downloading weights. A user's model (a ``python`` factory) is built once on
the CPU, as loading builds it, and answers one input of the configured size.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator

from xai_audit.tasks.core.config import AuditConfig, ConfigErrors, ModelConfig
from xai_audit.tasks.core.errors import ConfigError, ItemError, XaiAuditError
from xai_audit.tasks.core.names import method_problems
from xai_audit.tasks.data.image_sets import iter_image_set
from xai_audit.tasks.data.images import load_rgb
from xai_audit.tasks.data.sources.registry import model_source
from xai_audit.tasks.dissect.clip_dissect import SIMILARITY_FUNCTIONS, load_concepts
from xai_audit.tasks.dissect.clip_weights import resolve_clip_weights
from xai_audit.tasks.dissect.labellers import LABELLERS
from xai_audit.tasks.explain.lime import SEARCH_KEYS, SEGMENTATIONS, check_segmentation_params
from xai_audit.tasks.explain.registry import EXPLAINERS
from xai_audit.tasks.explain.targets import unknown_class_names
from xai_audit.tasks.world.recipe import demo_recipe


def _closest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3)
    return (
        f"closest: {', '.join(close)}"
        if close
        else f"valid: {', '.join(valid[:30])}{' ...' if len(valid) > 30 else ''}"
    )


def model_problems(index: int, model: ModelConfig) -> Iterator[tuple[str, str]]:
    """Unknown architectures and weights (as the entry's source checks them) and layer names of one model entry."""
    field = f"models.{index}"
    try:
        source = model_source(model.source, field)
    except ConfigError as error:
        yield error.field, error.message
        return
    missing = list(source.missing_fields(model, field))
    if missing:
        yield from missing
        return
    refused = list(source.problems(model, field))
    yield from refused
    try:
        skeleton = source.skeleton(model) or (None if refused else source.built(model, field))
    except ConfigError as error:  # the user's factory cannot be imported, built or run, or its width is off
        yield error.field, error.message
        return
    if skeleton is None:
        return
    names = [name for name, _ in skeleton.named_modules() if name]
    for key, layers in (("cam_layer", [model.cam_layer] if model.cam_layer else []), ("layers", model.layers or [])):
        for layer in layers:
            if layer not in names:
                yield f"{field}.{key}", f"unknown layer {layer!r}; {_closest(layer, names)}"


def image_set_problem(config: AuditConfig) -> tuple[str, str] | None:
    """An image set to explain without one image that decodes (images are tried in order until one does)."""
    listed, first_error = 0, None
    for item in iter_image_set(config):
        listed += 1
        try:
            if isinstance(item, ItemError):
                raise item
            load_rgb(item.path, item_id=item.image_id)
            return None
        except ItemError as error:
            first_error = first_error or error
    where = config.images.list_file if config.images.kind == "list" else config.images.root
    if not listed:
        return "images", f"the image set is empty ({where}); point images.root (or images.list_file) at your images"
    return (
        "images",
        f"none of the {listed} image(s) at {where} decodes (first: {first_error}); "
        "give image files Pillow reads (JPEG, PNG, ...)",
    )


def set_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """Image sets without a decodable image and concept sets that are empty or unreadable."""
    if config.explain.enabled and config.images.kind != "world":
        try:
            problem = image_set_problem(config)
            if problem:
                yield problem
        except ConfigError as error:
            yield error.field, error.message
    concepts = config.dissect.concepts
    if config.dissect.enabled and "clip_dissect" in config.dissect.methods and concepts.source == "file":
        try:
            load_concepts(concepts.path, field="dissect.concepts.path")
        except ConfigError as error:
            yield error.field, error.message


def lime_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """Segmentation algorithms and parameters of LIME and its search grid that scikit-image lacks."""
    if not config.explain.enabled or "lime" not in config.explain.methods:
        return
    lime = config.explain.lime
    entries = [("explain.lime.segmentation_params", lime.segmentation, lime.segmentation_params)]
    if lime.search.enabled:
        entries += [
            (
                f"explain.lime.search.grid.{index}",
                str(entry.get("segmentation", "quickshift")),
                {key: value for key, value in entry.items() if key not in SEARCH_KEYS},
            )
            for index, entry in enumerate(lime.search.grid)
        ]
    for where, algorithm, params in entries:
        if algorithm not in SEGMENTATIONS:
            yield (
                f"{where}.segmentation",
                f"unknown segmentation algorithm {algorithm!r}; valid: {', '.join(SEGMENTATIONS)}",
            )
            continue
        try:
            check_segmentation_params(algorithm, params, where=where)
        except ConfigError as error:
            yield error.field, error.message


def probe_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """A probe limit below what the CLIP-Dissect similarity function ranks (its ``top_k`` images)."""
    dissect = config.dissect
    if not dissect.enabled or "clip_dissect" not in dissect.methods or dissect.probe.limit is None:
        return
    top_k = inspect.signature(SIMILARITY_FUNCTIONS[dissect.clip.similarity]).parameters.get("top_k")
    if top_k is not None and dissect.probe.limit < top_k.default:
        yield (
            "dissect.probe.limit",
            f"{dissect.probe.limit} probe images are fewer than the {top_k.default} top images "
            f"{dissect.clip.similarity} ranks per unit; raise the limit or pick another similarity function",
        )


def registry_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """Method names the loaded registries do not know: explainers, labellers, CLIP-Dissect similarities
    (members registered at run time included, which the light tables of :mod:`xai_audit.tasks.core.names`
    cannot hold)."""
    return method_problems(config, EXPLAINERS, LABELLERS, SIMILARITY_FUNCTIONS)


def concept_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """Concept-attribution layers that no model dissects (they would silently get no rows); only
    decidable when every model lists its layers (the defaults depend on the architecture)."""
    concepts = config.explain.concepts
    if not concepts.enabled or concepts.layers is None or any(model.layers is None for model in config.models):
        return
    dissected = {layer for model in config.models for layer in model.layers or []}
    missing = [layer for layer in concepts.layers if layer not in dissected]
    if missing:
        yield (
            "explain.concepts.layers",
            f"{missing} are not in any model's models.layers, so no unit there is labelled; dissected: "
            f"{sorted(dissected) or 'none'}",
        )


def target_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """``explain.target`` class names a model does not have (or a topk above its classes), for the
    models whose class names are known without loading them."""
    if not config.explain.enabled or config.explain.target in ("predicted", "label"):
        return
    for index, model in enumerate(config.models):
        try:
            names = model_source(model.source, f"models.{index}").class_names(model)
        except ConfigError:
            continue  # an unknown source is a problem of its own
        if names is not None:
            yield from unknown_class_names(config.explain.target, names, model.name)


def clip_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """A CLIP whose weights are not in open_clip's or the Hugging Face cache (nothing is downloaded)."""
    dissect = config.dissect
    if not dissect.enabled or "clip_dissect" not in dissect.methods:
        return
    try:
        resolve_clip_weights(dissect.clip.model, dissect.clip.pretrained)
    except ConfigError as error:
        yield error.field, error.message


def recipe_problems() -> Iterator[tuple[str, str]]:
    """A malformed ``$XAI_AUDIT_DEMO_RECIPE`` (read when the demo model or toy CLIP is trained)."""
    try:
        demo_recipe()
    except ConfigError as error:
        yield error.field, error.message


def synthetic_probe_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """Models that were not trained on the synthetic world, to be labelled with its probe images or
    concepts: their labels would name the world's shapes, colours and textures whatever the model
    learnt. Refused unless ``dissect.allow_synthetic`` says it is meant."""
    dissect = config.dissect
    if not dissect.enabled or dissect.allow_synthetic:
        return
    foreign = []
    for index, model in enumerate(config.models):
        try:
            if not model_source(model.source, f"models.{index}").trained_on_world:
                foreign.append(model.name)
        except ConfigError:
            continue  # an unknown source is a problem of its own
    if not foreign:
        return
    who = f"{', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} not trained on the synthetic world"
    options = (
        "label on a probe set of your own or Broden (dissect.probe: {kind: broden, root: ...}, dissect.concepts: "
        "{source: broden} or a concept file), turn labelling off (dissect.enabled: false), or set "
        "dissect.allow_synthetic: true if the synthetic labels are meant"
    )
    if dissect.probe.kind == "world":
        yield (
            "dissect.probe",
            f"{who}, whose images are the probe set; {options}",
        )
    elif dissect.concepts.source == "world" and "clip_dissect" in dissect.methods:
        yield (
            "dissect.concepts",
            f"{who}, whose concepts would label it; {options}",
        )


def check(config: AuditConfig) -> None:
    """Raise :class:`ConfigErrors` listing every problem these checks find."""
    problems = list(registry_problems(config)) + list(recipe_problems())
    problems += [problem for index, model in enumerate(config.models) for problem in model_problems(index, model)]
    problems += list(clip_problems(config))
    problems += list(synthetic_probe_problems(config))
    problems += list(lime_problems(config))
    problems += list(concept_problems(config))
    problems += list(target_problems(config))
    if not any(field == "dissect.clip.similarity" for field, _ in problems):  # it looks the similarity up
        problems += list(probe_problems(config))
    try:
        problems += list(set_problems(config))
    except XaiAuditError as error:
        problems.append(("(sets)", str(error)))
    if problems:
        raise ConfigErrors(problems)
