"""Where the configured CLIP's weights are on this machine, decided from the caches alone.

open_clip downloads a pretrained tag's weights on first use: from the Hugging Face hub into its
cache (``$HF_HUB_CACHE/models--<org>--<name>/snapshots/<revision>/<file>``) or, for tags published
by URL only, into ``~/.cache/clip``. Offline, a missing file costs minutes of retries and ends in
a traceback. xai-audit never downloads CLIP weights: preflight resolves a tag to the file open_clip
would have cached, refuses the config naming that path when it is absent, and the run loads the
resolved file, so no code path reaches for the network.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xai_audit.tasks.core.errors import ConfigError

TOY_CLIP = "xai-toy-clip"  # the world's CLIP, trained on first use (:mod:`xai_audit.tasks.world.toy_clip`)
URL_CACHE = Path("~/.cache/clip")  # open_clip's download root for tags published by URL only
SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass(frozen=True)
class ClipWeights:
    """What ``open_clip.create_model_and_transforms`` is given: a model name and a local file, plus the
    tag's preprocessing, which open_clip applies for a tag but not for a file."""

    model: str
    checkpoint: str | None
    preprocess: tuple[tuple[str, Any], ...] = ()
    """The tag's ``image_*`` arguments (mean, std, interpolation, resize mode) as pairs, so the value hashes."""

    def open_clip_kwargs(self) -> dict[str, Any]:
        """``pretrained`` and the ``image_*`` overrides that make the file load as its tag would."""
        return {"pretrained": self.checkpoint, **dict(self.preprocess)}


def _tag_preprocess(cfg: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    keys = ("mean", "std", "interpolation", "resize_mode")
    return tuple((f"image_{key}", cfg[key]) for key in keys if cfg.get(key) is not None)


def _fetch_hint(model: str, tag: str) -> str:
    arguments = f"'{model}'" + (f", pretrained='{tag}'" if tag else "")
    return (
        "where there is network, run python -c "
        f'"import open_clip; open_clip.create_model_and_transforms({arguments})" '
        "(it downloads into that cache) and copy the file to the path above, or give a checkpoint file in "
        "dissect.clip.pretrained"
    )


def _hub_file(repo: str, filenames: list[str], model: str, tag: str) -> str:
    """The first of ``filenames`` in the hub cache; ConfigError naming where open_clip would put it."""
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    others = f" (or {', '.join(filenames[:-1])})" if len(filenames) > 1 else ""
    where, what = ("dissect.clip.pretrained", f"{model} {tag!r}") if tag else ("dissect.clip.model", model)
    raise ConfigError(
        where,
        f"the weights of {what} are not cached: expected {folder}/snapshots/<revision>/{filenames[-1]}{others} "
        f"from the Hugging Face hub repository {repo}; xai-audit does not download CLIP weights: "
        f"{_fetch_hint(model, tag)}",
    )


def _tag_file(model: str, tag: str, cfg: dict[str, Any]) -> str:
    """The cached file of a pretrained tag, where open_clip's download would have put it."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives, has_hf_hub

    if "file" in cfg:
        return str(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub and has_hf_hub():
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        return _hub_file(repo, [*_get_safe_alternatives(filename), filename], model, tag)
    url = cfg.get("url", "")
    path = URL_CACHE.expanduser() / os.path.basename(url)
    if path.is_file():
        return str(path)
    raise ConfigError(
        "dissect.clip.pretrained",
        f"the weights of {model} {tag!r} are not cached: expected {path} (open_clip's download of {url}); "
        f"xai-audit does not download CLIP weights: {_fetch_hint(model, tag)}",
    )


def _schema_weights(model: str) -> ClipWeights:
    """``hf-hub:org/repo`` as the ``local-dir:`` of its cached snapshot; ``local-dir:`` as given, once it exists."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    schema, _, identifier = model.partition(":")
    if schema == "local-dir":
        if not (Path(identifier).expanduser() / HF_CONFIG_NAME).is_file():
            raise ConfigError("dissect.clip.model", f"{model}: no {HF_CONFIG_NAME} in {identifier}")
        return ClipWeights(model, None)
    config = _hub_file(identifier, [HF_CONFIG_NAME], model, "")
    weights = _hub_file(identifier, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], model, "")
    if Path(config).parent != Path(weights).parent:
        raise ConfigError("dissect.clip.model", f"{model}: {config} and {weights} are cached from different revisions")
    return ClipWeights(f"local-dir:{Path(config).parent}", None)


def resolve_clip_weights(model: str, pretrained: str | None) -> ClipWeights:
    """The configured CLIP as a model name plus a local weights file (None: the toy CLIP's own
    default, or a ``local-dir:``/cached ``hf-hub:`` folder that holds its weights).

    Raises :class:`ConfigError` at ``dissect.clip.model`` or ``dissect.clip.pretrained`` for an
    unknown model, a missing file, or weights that are not in the caches.
    """
    if model == TOY_CLIP:
        if pretrained is not None and not Path(pretrained).expanduser().is_file():
            raise ConfigError("dissect.clip.pretrained", f"no such checkpoint file: {pretrained}")
        return ClipWeights(model, str(Path(pretrained).expanduser()) if pretrained else None)
    if model.startswith(SCHEMAS):
        return _schema_weights(model)
    import open_clip

    known = open_clip.list_models()
    if model.replace("/", "-") not in known:
        close = difflib.get_close_matches(model, known, n=3)
        hint = f"closest: {', '.join(close)}" if close else "see open_clip.list_models()"
        raise ConfigError("dissect.clip.model", f"unknown open_clip model {model!r}; {hint}")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        raise ConfigError(
            "dissect.clip.pretrained",
            f"{model} without pretrained weights is a random CLIP, whose labels mean nothing; give a tag "
            f"({', '.join(tags) or 'open_clip publishes none'}) or a checkpoint file",
        )
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if cfg:
        return ClipWeights(model, _tag_file(model, pretrained, cfg), _tag_preprocess(cfg))
    path = Path(pretrained).expanduser()
    if path.is_file():
        return ClipWeights(model, str(path))
    raise ConfigError(
        "dissect.clip.pretrained",
        f"{pretrained!r} is neither a pretrained tag of {model} ({', '.join(tags) or 'none'}) nor an existing file",
    )
