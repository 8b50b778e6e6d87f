"""The one-run audit's p-values and bounds: PRIVACY.md values and jax_privacy.auditing."""

import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pytest

from fedfm.audit.one_run import audit_scores, epsilon_lower_bound, p_value


def test_reachable_bounds_with_every_guess_correct_match_privacy_md():
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5) == pytest.approx(5.78, abs=0.005)
    assert epsilon_lower_bound(10000, 10000, 10000, 1e-5) == pytest.approx(7.83, abs=0.005)


def test_chance_level_guessing_gives_no_bound():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0


def test_p_value_grows_with_epsilon_and_bound_is_where_it_crosses():
    values = [p_value(e, 1000, 200, 170, 1e-5) for e in (0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values)
    bound = epsilon_lower_bound(1000, 200, 170, 1e-5, 0.05)
    assert p_value(bound - 1e-3, 1000, 200, 170, 1e-5) < 0.05 <= p_value(bound + 1e-3, 1000, 200, 170, 1e-5)


def test_audit_scores_counts_guesses():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    audit = audit_scores(scores, included, k_pos=2, k_neg=2, delta=1e-5)
    assert (audit.guesses, audit.correct) == (4, 4)  # top two included, bottom two excluded
    audit = audit_scores(scores, included, k_pos=3, k_neg=0, delta=1e-5)
    assert audit.correct == 2


def _jax_privacy_auditing():
    """jax_privacy/auditing.py needs only numpy, scipy and dp-accounting; load it without the package."""
    try:
        files = distribution("jax-privacy").files
    except PackageNotFoundError:
        pytest.skip("jax-privacy is not installed (optional test dependency)")
    path = next(Path(f.locate()) for f in files if str(f).endswith("jax_privacy/auditing.py"))
    spec = importlib.util.spec_from_file_location("jax_privacy_auditing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("m, guesses, correct", [(1000, 1000, 1000), (1000, 200, 170), (10000, 500, 400), (500, 100, 60)])
def test_p_values_and_bounds_match_jax_privacy(m, guesses, correct):
    reference = _jax_privacy_auditing()
    for eps in (0.1, 0.5, 1.0, 2.0, 4.0):
        for delta in (0.0, 1e-5):
            assert p_value(eps, m, guesses, correct, delta) == pytest.approx(
                reference._one_run_p_value(m, guesses, correct, eps, delta), rel=1e-9, abs=1e-15)
    ours = epsilon_lower_bound(m, guesses, correct, 1e-5, 0.05)
    theirs = reference._epsilon_one_run(0.0, m, guesses, correct, 0.05, 1e-5)
    assert ours == pytest.approx(theirs, abs=1e-5)
