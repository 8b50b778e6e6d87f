"""Epsilons against the reference values in shared/notes/PRIVACY.md (opacus 1.6.0)."""

import pytest
from opacus.accountants import create_accountant

from fedfm.privacy.accountant import SiteAccountant, StepBatch, calibrate_noise

REFERENCE = [  # sigma, q, steps, delta, Opacus RDP, Opacus PRV
    (1.1, 256 / 60000, 14062, 1e-5, 2.596556, 2.391744),
    (0.7, 256 / 60000, 10546, 1e-5, 6.318101, 5.649767),
    (4.0, 0.01, 10000, 1e-5, 1.035490, 0.956936),
    (1.0, 32 / 2000, 1860, 2000**-1.1, 3.774943, 3.354128),  # delta 2.34e-4 = n^-1.1
]


@pytest.mark.parametrize("sigma, q, steps, delta, rdp, prv", REFERENCE)
def test_site_accountant_matches_reference_epsilons(sigma, q, steps, delta, rdp, prv):
    assert SiteAccountant("rdp", [StepBatch(sigma, q, steps)]).epsilon(delta) == pytest.approx(rdp, abs=1e-5)
    assert SiteAccountant("prv", [StepBatch(sigma, q, steps)]).epsilon(delta) == pytest.approx(prv, abs=1e-5)


def test_rounds_compose_like_privacy_md_example():
    # 10 rounds x 62 steps (sigma 1.0, q 0.016) then 5 rounds x 75 steps (sigma 1.2, q 1/75)
    rounds = [StepBatch(1.0, 0.016, 62)] * 10 + [StepBatch(1.2, 1 / 75, 75)] * 5
    assert SiteAccountant("rdp", rounds).epsilon(1e-5) == pytest.approx(2.981786, abs=1e-5)
    assert SiteAccountant("prv", rounds).epsilon(1e-5) == pytest.approx(2.662734, abs=1e-5)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_k_rounds_equal_one_continuous_accountant(mechanism):
    continuous = create_accountant(mechanism)
    site = SiteAccountant(mechanism)
    for _ in range(4):
        for _ in range(50):
            continuous.step(noise_multiplier=0.9, sample_rate=0.02)
        site.add(StepBatch(0.9, 0.02, 50))
    assert site.opacus.history == continuous.history
    assert site.epsilon(1e-5) == continuous.get_epsilon(1e-5)


def test_epsilon_after_does_not_change_history():
    site = SiteAccountant("rdp", [StepBatch(1.0, 0.01, 100)])
    before = site.epsilon(1e-5)
    projected = site.epsilon_after(StepBatch(1.0, 0.01, 100), 1e-5)
    assert projected > before
    assert site.epsilon(1e-5) == before
    assert projected == SiteAccountant("rdp", [StepBatch(1.0, 0.01, 200)]).epsilon(1e-5)


def test_calibrated_noise_matches_privacy_md():
    q, steps = 256 / 60000, int(60 / (256 / 60000))
    assert calibrate_noise(8.0, 1e-5, q, steps, "rdp") == pytest.approx(0.6781, abs=1e-3)
    sigma = calibrate_noise(3.0, 1e-5, q, steps, "prv")
    assert sigma == pytest.approx(0.9717, abs=1e-3)
    assert SiteAccountant("prv", [StepBatch(sigma, q, steps)]).epsilon(1e-5) <= 3.0


def test_empty_accountant_has_zero_epsilon():
    assert SiteAccountant("prv").epsilon(1e-5) == 0.0


def test_client_level_reference_without_amplification():
    # PRIVACY.md: z = 1, 50 rounds, delta 1e-3, no amplification -> 49.4 (RDP) / 46.0 (PLD)
    rounds = [StepBatch(1.0, 1.0, 1)] * 50
    assert SiteAccountant("rdp", rounds).epsilon(1e-3) == pytest.approx(49.4, abs=0.01)
    assert SiteAccountant("prv", rounds).epsilon(1e-3) == pytest.approx(46.0, abs=0.05)


def test_the_same_history_is_computed_once_and_a_changed_one_afresh():
    """A round's budget check and its ledger entry ask for the same history's epsilon: the second
    is the first's number, not a second PRV computation; a history Opacus itself stepped is new."""
    from fedfm.privacy.accountant import history_epsilon

    site = SiteAccountant("prv", [StepBatch(0.93, 0.011, 77)])
    projected = site.epsilon_after(StepBatch(0.93, 0.011, 33), 1e-5)
    misses = history_epsilon.cache_info().misses
    site.add(StepBatch(0.93, 0.011, 33))
    assert site.epsilon(1e-5) == projected and history_epsilon.cache_info().misses == misses
    for _ in range(5):
        site.opacus.step(noise_multiplier=0.93, sample_rate=0.011)  # what the privacy engine does while training
    reference = create_accountant("prv")
    reference.history = [(0.93, 0.011, 115)]  # Opacus merges steps at the same noise and rate
    assert site.epsilon(1e-5) == reference.get_epsilon(1e-5) > projected


def test_remembered_per_step_rdp_gives_opacus_own_epsilons_to_the_bit(monkeypatch):
    """fedfm keeps Opacus' per-step RDP values (a pure function) across histories: the epsilons of
    growing histories, RDP and PRV, equal Opacus' without it exactly, and a history that grew by
    the same noise and rate computes no per-step value again."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedfm.privacy.accountant import remember_rdp_per_step

    assert remember_rdp_per_step() and hasattr(opacus_rdp._compute_rdp, "cache_info")
    histories = [[(0.93, 0.011, 77 * k)] for k in (1, 2, 3)] + [[(20.0, 1.0, 1), (1.1, 0.19, 45)]]

    def epsilons():
        out = []
        for history in histories:
            for mechanism in ("rdp", "prv"):
                accountant = create_accountant(mechanism)
                accountant.history = list(history)
                out.append(accountant.get_epsilon(1e-5))
        return out

    remembered = epsilons()
    opacus_rdp._compute_rdp.cache_clear()
    accountant = create_accountant("prv")
    accountant.history = [(0.93, 0.011, 77)]
    accountant.get_epsilon(1e-5)
    first = opacus_rdp._compute_rdp.cache_info().misses
    accountant.history = [(0.93, 0.011, 154)]  # the next round: same noise and rate, more steps
    accountant.get_epsilon(1e-5)
    assert opacus_rdp._compute_rdp.cache_info().misses == first > 0
    monkeypatch.setattr(opacus_rdp, "_compute_rdp", opacus_rdp._compute_rdp.__wrapped__)  # Opacus as shipped
    assert epsilons() == remembered
