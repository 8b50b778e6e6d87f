"""The one in-process cache of pristine models: what a site or the server builds again every
round (a backbone, or a backbone with its seeded adapter) is built once per process and handed
out as deep copies, so no caller ever sees another's weights."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_PRISTINE: dict[tuple[str, str], object] = {}


def pristine(kind: str, key: str, build: Callable[[], T]) -> T:
    """The object ``build()`` makes for (``kind``, ``key``), built on first use and kept unchanged.
    Callers copy what they change (see :func:`fresh`)."""
    if (kind, key) not in _PRISTINE:
        _PRISTINE[(kind, key)] = build()
    return _PRISTINE[(kind, key)]  # type: ignore[return-value]


def fresh(kind: str, key: str, build: Callable[[], T]) -> T:
    """A deep copy of the pristine object, safe to train."""
    return copy.deepcopy(pristine(kind, key, build))


def clear_model_cache() -> None:
    """Forget every cached pristine model (frees their memory)."""
    _PRISTINE.clear()
