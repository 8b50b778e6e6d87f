"""Fixtures of the deployment tests."""

import pytest


@pytest.fixture()
def flower_pull_defaults():
    """Flower's own waits for a message object that is not there yet, during the test and after it
    (``runtime.superexec.shorten_object_pulls`` changes them for the whole process)."""
    pytest.importorskip("flwr")
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF
    from flwr.supercore.inflatable import inflatable_utils

    pulls = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(pull.__kwdefaults__) for pull in pulls]
    for pull in pulls:
        pull.__kwdefaults__["initial_backoff"] = PULL_INITIAL_BACKOFF
    yield
    for pull, defaults in zip(pulls, saved):
        pull.__kwdefaults__.clear()
        pull.__kwdefaults__.update(defaults)
