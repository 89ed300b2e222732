"""Clinical tasks, one module each; a route names a handler by its module name."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any

from handlers.base import Handler


def handler_class(name: str) -> type[Handler]:
    """The Handler in ``handlers/<name>.py`` whose ``name`` is ``name``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"handler name {name!r} is not a module name")
    try:
        module = importlib.import_module(f"handlers.{name}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"no handler named {name!r}") from exc
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Handler) and getattr(value, "name", None) == name:
            return value
    raise ValueError(f"handlers/{name}.py defines no Handler named {name!r}")


def get_handler(name: str, companions: Mapping[str, Any] | None = None) -> Handler:
    """A handler for one job, with the companion models its route gives it (see Handler)."""
    return handler_class(name)(companions)
