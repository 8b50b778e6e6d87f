"""The data section checked against the data itself, and completed from it, before a run starts.

:func:`resolve_data` is the one step the command line takes before Flower or a run folder: it
reads the data's facts (:func:`fedfm.data.inspect.inspect_data`), fails in one line where the
config says something else (``data.num_classes``, ``data.dataset``) and fills in what the config
left out, so the ServerApp and every ClientApp receive the resolved values in the run config.
"""

from __future__ import annotations

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.inspect import DataFacts, inspect_data


def check_data(cfg: DataConfig) -> DataFacts:
    """The data's facts, after checking ``data.num_classes`` (when set) against them."""
    facts = inspect_data(cfg)
    if cfg.num_classes is not None and cfg.num_classes != facts.num_classes:
        raise DataError(
            f"data.num_classes={cfg.num_classes} but {facts.where} {facts.classes_from}: "
            f"set data.num_classes={facts.num_classes} or leave it out"
        )
    return facts


def resolve_data(cfg: DataConfig) -> DataFacts:
    """Check ``cfg`` against its data and fill in ``data.num_classes`` and ``data.dataset`` from it (in place).

    A resumed run keeps its recorded config unchanged: it calls :func:`check_data` instead.
    """
    facts = check_data(cfg)
    if cfg.dataset is not None and cfg.dataset != facts.dataset:
        raise DataError(
            f"data.dataset={cfg.dataset!r} but {facts.where} is {facts.dataset!r}: leave data.dataset out "
            "(it is read from the data)"
        )
    cfg.num_classes = facts.num_classes
    cfg.dataset = facts.dataset
    return facts
