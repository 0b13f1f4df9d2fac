"""README reference blocks generated from the code (config models, table schemas), so they cannot drift."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from xai_audit.storage.schemas import describe_tables
from xai_audit.tasks.core.config import AuditConfig


def _nested_model(annotation: typing.Any) -> type[BaseModel] | None:
    """The section model an annotation holds directly or as a list item."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found:
            return found
    return None


def _type_name(annotation: typing.Any) -> str:
    """A short human name for a field type (``int > 0 or null``, ``one of: a, b``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        bounds = [
            f"> {item.gt}"
            for item in annotation.__metadata__
            for item in getattr(item, "metadata", [item])
            if hasattr(item, "gt")
        ]
        return " ".join([_type_name(args[0])] + bounds)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _is_union(annotation: typing.Any) -> bool:
    """Whether a field takes one of several shapes (a value or a section, e.g. ``explain.target``)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        value = [
            item.model_dump(mode="json", exclude_defaults=True) if isinstance(item, BaseModel) else item
            for item in value
        ]
        return f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`"


def iter_options(model: type[BaseModel] = AuditConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """Every option as (dotted path, type, default, description), sections before their fields."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        yield (
            path,
            _type_name(field.annotation)
            if not nested or _is_union(field.annotation)
            else ("list of sections" if typing.get_origin(field.annotation) is list else "section"),
            _default(field),
            field.description or "",
        )
        if nested:
            yield from iter_options(nested, f"{path}[]." if typing.get_origin(field.annotation) is list else f"{path}.")


def config_reference() -> str:
    """Markdown table of every option with its type, default and meaning."""
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{path}` | {kind} | {default} | {text} |" for path, kind, default, text in iter_options()]
    return "\n".join(lines) + "\n"


def _first_line(obj: object) -> str:
    return " ".join((type(obj).__doc__ or "").split("\n\n")[0].split()).replace("|", "\\|")


def registries_reference() -> str:
    """Markdown of every registered name a config may use: explainers, metrics, labellers, sources."""
    from xai_audit.tasks.data.sources.registry import SOURCES
    from xai_audit.tasks.dissect.clip_dissect import SIMILARITY_FUNCTIONS
    from xai_audit.tasks.dissect.labellers import LABELLERS
    from xai_audit.tasks.explain.registry import EXPLAINERS
    from xai_audit.tasks.metrics.registry import METRICS

    families: dict[int, tuple[object, list[str]]] = {}
    for method, family in EXPLAINERS.items():
        families.setdefault(id(family), (family, []))[1].append(method)
    lines = [
        "**Explanation methods** (`explain.methods`; `tasks/explain/registry.py`)",
        "",
        "| methods | family | ROAD |",
        "|---|---|---|",
    ]
    lines += [
        f"| {', '.join(f'`{m}`' for m in methods)} | {_first_line(family)} | {'yes' if family.road else 'no'} |"
        for family, methods in families.values()
    ]
    lines += [
        "",
        "**Metrics** (`tasks/metrics/registry.py`; ↑ higher is better, ↓ lower is better)",
        "",
        "| metric | category | table | values (summary column) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{metric.name}` | {metric.category} | `{metric.table}` | "
        + ", ".join(f"`{score.column}` {score.arrow} (`{score.summary}`)" for score in metric.scores)
        + " |"
        for metric in METRICS.values()
    ]
    lines += [
        "",
        "**Labelling methods** (`dissect.methods`; `tasks/dissect/labellers.py`)",
        "",
        "| method | work unit | what it is |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{name}` | one per {labeller.fan_out} | {_first_line(labeller)} |" for name, labeller in LABELLERS.items()
    ]
    lines += [
        "",
        "**CLIP-Dissect similarity functions** (`dissect.clip.similarity`): "
        + ", ".join(f"`{name}`" for name in SIMILARITY_FUNCTIONS)
        + ".",
        "",
        "**Model sources** (`models[].source`; `tasks/data/sources/registry.py`)",
        "",
        "| source | what it loads |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_first_line(source)} |" for name, source in SOURCES.items()]
    return "\n".join(lines) + "\n"


GENERATED_BLOCKS = {
    "config-reference": config_reference,
    "registries-reference": registries_reference,
    "tables-reference": describe_tables,
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def block_text(document: str, name: str) -> str | None:
    """The current content of a generated block in ``document`` (None when its markers are absent)."""
    begin, end = markers(name)
    if begin not in document or end not in document:
        return None
    return document.split(begin, 1)[1].split(end, 1)[0].strip()


def refresh(document: str) -> str:
    """``document`` with every generated block rewritten from the code."""
    for name, generate in GENERATED_BLOCKS.items():
        begin, end = markers(name)
        if block_text(document, name) is not None:
            head, rest = document.split(begin, 1)
            document = f"{head}{begin}\n{generate().strip()}\n{end}{rest.split(end, 1)[1]}"
    return document


if __name__ == "__main__":
    import sys
    from pathlib import Path

    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(refresh(readme.read_text()))
