"""Privacy of hyperparameter tuning: composition of trials and the Papernot-Steinke bounds."""

import logging
import math

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting import rdp as dp_rdp
from opacus.accountants import RDPAccountant, create_accountant

from fedfm.privacy.accountant import SiteAccountant, StepBatch
from fedfm.privacy.ledger import SiteLedger
from fedfm.privacy.tuning import (
    ORDERS,
    composed_epsilon,
    expected_trials_tnb,
    fixed_trials_epsilon,
    ps_epsilon,
    ps_rdp_poisson,
    ps_rdp_truncated_negative_binomial,
)

DELTA = 1e-5
TRIAL_A = [(1.0, 0.02, 100), (1.2, 0.02, 50)]
TRIAL_B = [(0.9, 0.01, 200), (1.1, 0.03, 80)]


def _history(batches, mechanism):
    """A trial's ledger entries, each with the cumulative epsilon computed at the time."""
    accountant, entries = SiteAccountant(mechanism), []
    for sigma, q, steps in batches:
        accountant.add(StepBatch(sigma, q, steps))
        entries.append({
            "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": DELTA,
            "accountant": mechanism, "epsilon": accountant.epsilon(DELTA),
        })
    return entries


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_composed_epsilon_equals_hand_fed_accountant_and_one_ledger(mechanism, tmp_path):
    histories = [_history(TRIAL_A, mechanism), _history(TRIAL_B, mechanism)]
    composed = composed_epsilon(histories, DELTA, mechanism)

    by_hand = create_accountant(mechanism)
    by_hand.history = [*TRIAL_A, *TRIAL_B]
    assert composed == pytest.approx(by_hand.get_epsilon(delta=DELTA), rel=1e-12)

    ledger = SiteLedger(tmp_path, "site-0")
    for number, entry in enumerate(histories[0] + histories[1], start=1):
        ledger.append(dict(entry, round=number))
    assert composed == pytest.approx(ledger.accountant(mechanism).epsilon(DELTA), rel=1e-12)
    # more than either trial alone
    assert composed > max(h[-1]["epsilon"] for h in histories)


def test_composing_more_trials_never_lowers_epsilon():
    a, b = _history(TRIAL_A, "rdp"), _history(TRIAL_B, "rdp")
    chain = [composed_epsilon(h, DELTA, "rdp") for h in ([], [a], [a, b], [a, b, a], [a, b, a, b])]
    assert chain[0] == 0.0
    assert all(x < y for x, y in zip(chain, chain[1:]))


def test_tnb_bound_matches_theorem_2_by_hand():
    # eps' = eps + (1+eta)(1-1/lam_hat) eps_hat + (1+eta) log(1/gamma)/lam_hat + log(E[K])/(lam-1)
    # rdp=1, lam=8, (lam_hat, eps_hat) = (4, 2), eta=1 (geometric), gamma=0.1 -> E[K] = 10:
    # 1 + 2 * 0.75 * 2 + 2 * log(10) / 4 + log(10) / 7 = 1 + 3 + 1.1512925465 + 0.3289407276
    by_hand = 1 + 3 + 2 * 2.302585092994046 / 4 + 2.302585092994046 / 7
    assert by_hand == pytest.approx(5.480233274067602, abs=1e-12)
    assert ps_rdp_truncated_negative_binomial(1.0, 8, 2.0, 4, eta=1, gamma=0.1) == pytest.approx(by_hand, rel=1e-12)
    # eta=0 (logarithmic), same gamma: E[K] = 9 / log(10) = 3.9086503371
    by_hand = 1 + 1 * 0.75 * 2 + 1 * 2.302585092994046 / 4 + math.log(3.908650337129266) / 7
    assert ps_rdp_truncated_negative_binomial(1.0, 8, 2.0, 4, eta=0, gamma=0.1) == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(ValueError):
        ps_rdp_truncated_negative_binomial(1.0, 8, 2.0, 4, eta=-1, gamma=0.1)
    with pytest.raises(ValueError):
        ps_rdp_truncated_negative_binomial(1.0, 1, 2.0, 4, eta=1, gamma=0.1)


def test_poisson_bound_matches_theorem_6_by_hand_and_its_side_condition():
    # eps' = eps + mu * delta_hat + log(mu)/(lam-1), if exp(eps_hat) <= 1 + 1/(lam-1) = 8/7
    by_hand = 1.0 + 10 * 1e-6 + 2.302585092994046 / 7
    assert ps_rdp_poisson(1.0, 8, eps_hat=0.1, delta_hat=1e-6, mu=10) == pytest.approx(by_hand, rel=1e-12)
    assert ps_rdp_poisson(1.0, 8, eps_hat=math.log(8 / 7), delta_hat=1e-6, mu=10) == pytest.approx(by_hand, rel=1e-12)
    assert ps_rdp_poisson(1.0, 8, eps_hat=0.14, delta_hat=1e-6, mu=10) == math.inf  # log(8/7) = 0.1335


def test_expected_trials_closed_forms_and_pmf():
    assert expected_trials_tnb(1, 0.1) == pytest.approx(10.0)  # geometric: 1/gamma
    assert expected_trials_tnb(1, 0.25) == pytest.approx(4.0)
    assert expected_trials_tnb(0, 0.1) == pytest.approx(0.9 / (0.1 * math.log(10)))  # logarithmic
    for eta, gamma in [(-0.5, 0.2), (0, 0.1), (0.5, 0.3), (1, 0.1), (2, 0.5)]:
        # Definition 1: P[K=k] = (1-gamma)^k / (gamma^-eta - 1) * prod_{l<k} (l+eta)/(l+1), k >= 1;
        # eta = 0: P[K=k] = (1-gamma)^k / (k log(1/gamma)).
        pmf, weight = [], 1.0
        for k in range(1, 3000):
            weight *= (k - 1 + eta) / k
            if eta == 0:
                pmf.append((1 - gamma) ** k / (k * math.log(1 / gamma)))
            else:
                pmf.append((1 - gamma) ** k * weight / (gamma**-eta - 1))
        assert sum(pmf) == pytest.approx(1.0, abs=1e-9)
        mean = sum(k * p for k, p in enumerate(pmf, start=1))
        assert expected_trials_tnb(eta, gamma) == pytest.approx(mean, rel=1e-9)


SETTINGS = [(1.0, 0.1, 500), (1.0, 0.01, 1000), (1.1, 256 / 60000, 14062)]  # sigma, q, steps


@pytest.mark.parametrize("sigma, q, steps", SETTINGS)
@pytest.mark.parametrize("distribution, params", [("tnb", {"eta": 1, "gamma": 0.1}), ("poisson", {"mu": 10})])
def test_random_k_bound_lies_between_one_trial_and_k_fold_composition(sigma, q, steps, distribution, params):
    tuned = ps_epsilon(sigma, q, steps, DELTA, distribution, **params)
    assert tuned.expected_trials == pytest.approx(10.0)
    assert tuned.order in ORDERS
    one, ten = fixed_trials_epsilon(sigma, q, steps, 1, DELTA), fixed_trials_epsilon(sigma, q, steps, 10, DELTA)
    assert one < tuned.epsilon < ten


@pytest.mark.parametrize("distribution, params, shape", [
    ("tnb", {"eta": 1, "gamma": 0.1}, 1.0),
    ("poisson", {"mu": 10}, math.inf),
])
def test_ps_epsilon_agrees_with_dp_accounting_repeat_and_select(distribution, params, shape):
    sigma, q, steps = 1.0, 0.01, 1000
    logging.getLogger("absl").setLevel(logging.ERROR)
    trial = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    other = dp_rdp.RdpAccountant(orders=list(ORDERS))
    other.compose(dp_event.RepeatAndSelectDpEvent(trial, mean=10.0, shape=shape))
    assert ps_epsilon(sigma, q, steps, DELTA, distribution, **params).epsilon == pytest.approx(
        other.get_epsilon(DELTA), rel=5e-3
    )


def test_fixed_trials_is_k_fold_rdp_composition():
    sigma, q, steps = 1.0, 0.01, 300
    grid = RDPAccountant.DEFAULT_ALPHAS
    k_fold = fixed_trials_epsilon(sigma, q, steps, 4, DELTA, orders=grid)
    assert k_fold == pytest.approx(SiteAccountant("rdp", [StepBatch(sigma, q, steps)] * 4).epsilon(DELTA), rel=1e-9)
    assert fixed_trials_epsilon(sigma, q, steps, 4, DELTA) <= k_fold + 1e-12  # the wider grid only helps


def test_ps_epsilon_rejects_missing_parameters():
    with pytest.raises(ValueError):
        ps_epsilon(1.0, 0.01, 100, DELTA, "tnb", eta=1)
    with pytest.raises(ValueError):
        ps_epsilon(1.0, 0.01, 100, DELTA, "poisson")
    with pytest.raises(ValueError):
        ps_epsilon(1.0, 0.01, 100, DELTA, "grid")


def test_a_searched_dp_baseline_is_charged_every_run_of_its_search(tmp_path):
    """A tuned study's local baseline keeps one ledger per trial and one for its final run: what it
    spent per site is all of them composed (never the final run's epsilon alone)."""
    from fedfm.audit.search import baseline_search_privacy
    from fedfm.report.collect import search_epsilon

    runs = [TRIAL_A, TRIAL_B, TRIAL_A]  # trial 1, trial 2, the chosen values once more with test
    folders = [tmp_path / "trials" / "local" / f"trial-{k:03d}" / "local" / "ledger" for k in range(2)]
    folders.append(tmp_path / "baselines" / "local" / "ledger")
    for folder, batches in zip(folders, runs):
        ledger = SiteLedger(folder, "site-0")
        for number, entry in enumerate(_history(batches, "rdp"), start=1):
            ledger.append(dict(entry, round=number))
    SiteLedger(tmp_path / "trials" / "local" / "trial-000" / "local" / "ledger", "site-1").append(
        dict(_history(TRIAL_B, "rdp")[0], round=1))  # a site with one entry in one run

    spent = baseline_search_privacy(tmp_path, "local")
    by_hand = create_accountant("rdp")
    by_hand.history = [*TRIAL_A, *TRIAL_B, *TRIAL_A]
    assert spent["site-0"]["runs"] == 3
    assert spent["site-0"]["epsilon_total"] == pytest.approx(by_hand.get_epsilon(delta=DELTA), rel=1e-12)
    assert spent["site-1"]["runs"] == 1
    final_alone = _history(TRIAL_A, "rdp")[-1]["epsilon"]
    assert spent["site-0"]["epsilon_total"] > final_alone * 1.5

    shown = search_epsilon(tmp_path, "local", {"train.lr": 0.002})
    assert shown == {"max_epsilon": spent["site-0"]["epsilon_total"], "search_runs": 3}
    assert search_epsilon(tmp_path, "local", None) == {}  # not searched: the run's own epsilon stands
    assert search_epsilon(tmp_path, "centralized_nodp", {"train.lr": 0.01}) == {}  # no DP, nothing spent

    from fedfm.audit.scope import scope_notes

    (tmp_path / "tuning.json").write_text('{"search": "grid", "trials": [], "runs_in_budget": 3}')
    local_note = [n for n in scope_notes(tmp_path) if "local baseline" in n]
    assert len(local_note) == 1 and f"site-0 {spent['site-0']['epsilon_total']:.3f} over 3 runs" in local_note[0]
