"""User code a config names as ``callable``: an importable ``package.module:function``, or a Python
file beside the config (``mymodel.py:build``) so a model needs no ``PYTHONPATH``.

A file is resolved from the config's folder like every other relative path (:func:`load_config
<xai_audit.tasks.core.config.load_config>` makes it absolute and keeps it inside the config's folder
or the current directory) and loaded under a module name unique to its path and contents, so two
``model.py`` files of two configs never shadow each other or an installed module. The string is
imported, never evaluated.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from xai_audit.tasks.core.errors import ConfigError

FILE_SUFFIX = ".py"


def split_target(target: str) -> tuple[str, str]:
    """``(module or file, attribute path)`` of ``module:attr`` / ``path/file.py:attr`` (the last colon splits,
    so a Windows drive letter stays with the path)."""
    location, _, attr = target.rpartition(":")
    return location, attr


def names_file(target: str) -> bool:
    """Whether ``target`` names a Python file (``mymodel.py:build``) rather than an importable module."""
    return split_target(target)[0].endswith(FILE_SUFFIX)


def _file_module(path: Path, field: str, target: str) -> ModuleType:
    """The module of the file at ``path``, executed once per path and contents."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path} for {target!r}: {exc}") from None
    digest = hashlib.sha256(str(path).encode() + b"\0" + source).hexdigest()[:16]
    name = f"xai_audit_user_{path.stem.replace('.', '_')}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(field, f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failing to run is a problem with this field
        del sys.modules[name]
        raise ConfigError(field, f"running {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def load_callable(target: str, field: str) -> Any:
    """The object ``target`` names (``package.module:function`` or ``/abs/file.py:function``), checked callable."""
    location, attr = split_target(target)
    if not location or not attr:
        raise ConfigError(field, f"expected 'package.module:function' or 'file.py:function', got {target!r}")
    try:
        if names_file(target):
            path = Path(location)
            if not path.is_absolute():  # load_config makes it absolute; a bare dict relies on the cwd
                path = Path.cwd() / path
            found: Any = _file_module(path, field, target)
        else:
            found = importlib.import_module(location)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(field, f"cannot import {target!r}: {exc}") from None
    if not callable(found):
        raise ConfigError(field, f"{target!r} is a {type(found).__name__}, not callable")
    return found
