"""Which variant of the demo training recipe the demo model and toy CLIP use by default.

The trained demo models differ between machines (bf16 autocast runs other kernels on AMX than on
AVX512-BF16 CPUs) and between seeds; ``XAI_AUDIT_DEMO_RECIPE`` picks one of those variants without
editing code, e.g. ``bf16=off,seed=1``, so the suite and users can check a result against the
spread (``benchmarks/demo_spread.py``). Each variant is its own cache entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from xai_audit.tasks.core.errors import ConfigError

RECIPE_ENV = "XAI_AUDIT_DEMO_RECIPE"
_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
_VALID = "comma-separated key=value of bf16=on|off and seed=<integer >= 0>, e.g. 'bf16=off,seed=1'"


@dataclass(frozen=True)
class DemoRecipe:
    """The varied part of the demo models' training: bf16 autocast (else fp32) and the seed."""

    bf16: bool = True
    seed: int = 0

    def label(self) -> str:
        """The variant as ``XAI_AUDIT_DEMO_RECIPE`` spells it (``bf16=on,seed=0``)."""
        return f"bf16={'on' if self.bf16 else 'off'},seed={self.seed}"


def parse_recipe(text: str) -> DemoRecipe:
    """A recipe from its ``key=value,...`` spelling; unnamed keys keep the default."""
    values: dict[str, bool | int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in ("bf16", "seed"):
            raise ConfigError(RECIPE_ENV, f"{item!r} is not a setting; expected {_VALID}")
        if key in values:
            raise ConfigError(RECIPE_ENV, f"{key} is given twice; expected {_VALID}")
        if key == "bf16":
            if value.lower() not in _SWITCH:
                raise ConfigError(RECIPE_ENV, f"bf16={value!r} is not on or off; expected {_VALID}")
            values[key] = _SWITCH[value.lower()]
        else:
            if not value.isdigit():
                raise ConfigError(RECIPE_ENV, f"seed={value!r} is not an integer >= 0; expected {_VALID}")
            values[key] = int(value)
    return DemoRecipe(**values)


def demo_recipe() -> DemoRecipe:
    """The variant ``$XAI_AUDIT_DEMO_RECIPE`` names (the default recipe when it is unset or empty)."""
    return parse_recipe(os.environ.get(RECIPE_ENV, ""))
