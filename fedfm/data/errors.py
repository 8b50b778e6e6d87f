"""The one error type the data layer raises for problems a user can fix."""

from __future__ import annotations

from fedfm.config import ConfigError


class DataError(ConfigError):
    """A data problem, phrased as one line naming the config key, the bad value and the fix."""
