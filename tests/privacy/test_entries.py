"""One typed ledger entry for every writer: the site's DP-SGD rounds and label-count release, the
server's client-level releases; the audit refuses an entry that lacks what it recomputes from."""

import json

import numpy as np
import torch

from fedfm.audit import audit_run
from fedfm.federation import ClientLevelDP, Reply
from fedfm.privacy.entries import LABEL_COUNTS, LedgerEntry
from fedfm.privacy.ledger import SiteLedger

CHAIN_AND_RUN = {"site", "prev_hash", "hash", "signature", "key_id", "run_id", "config_hash"}


def _written(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_entry_round_trips_and_drops_unset_fields():
    entry = LedgerEntry(round=2, steps=10, noise_multiplier=1.1, sample_rate=0.05, delta=1e-5, accountant="prv",
                        epsilon=0.7, sampling="poisson", max_grad_norm=1.0)
    record = entry.to_record()
    assert "kind" not in record and "class_weights" not in record
    assert LedgerEntry.from_record({**record, "hash": "x", "site": "site-0"}) == entry
    assert entry.batch.steps == 10 and not entry.is_label_count_release


def test_client_level_releases_are_typed_entries(tmp_path):
    current = {"w": torch.zeros(3)}
    dp = ClientLevelDP(1.0, 1.0, 1, 2, 1e-3, tmp_path, rng=np.random.default_rng(0))
    dp.aggregate(1, current, [Reply(0, {"w": torch.ones(3)}, {"site-id": 0, "client-weight": 1})])
    (line,) = _written(tmp_path / "client-level.jsonl")
    typed = LedgerEntry.from_record(line)
    assert typed.sampling == "no-amplification" and typed.population == 2 and typed.sampled_sites == 1
    assert set(line) - CHAIN_AND_RUN == set(typed.to_record())


def test_the_audit_names_an_entry_that_is_not_a_ledger_entry(tmp_path):
    SiteLedger(tmp_path, "site-0").append({"round": 1, "epsilon": 0.5})  # no steps, noise, sample rate...
    (audit,) = audit_run(tmp_path)
    assert not audit.passed
    assert any("entry 1 is not a ledger entry" in p and "steps" in p for p in audit.problems)


def test_label_count_kind_is_one_constant():
    release = LedgerEntry(round=1, steps=1, noise_multiplier=20.0, sample_rate=1.0, delta=1e-5, accountant="rdp",
                          epsilon=0.01, kind=LABEL_COUNTS, sampling="no-amplification")
    assert release.is_label_count_release
