"""Anchored ledger heads: every attack on a site's ledger is caught by the audit, naming site and entry,
and a site refuses to train on a ledger behind the last head it signed."""

import json
import shutil

import pytest

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict
from fedfm.privacy.accountant import SiteAccountant, StepBatch
from fedfm.privacy.anchors import AnchorLog, AnchorRejected
from fedfm.audit.ledgers import audit_run
from fedfm.privacy.heads import HeadStore, LedgerRolledBack, head_of
from fedfm.privacy.ledger import SiteLedger, entry_hash
from fedfm.privacy.signing import simulation_signer
from fedfm.site import Site


def _federation(run, rounds=4, sites=("site-0", "site-1")):
    """Sites that append a signed entry per round and send their head; the coordinator anchors it."""
    anchors = AnchorLog(run / "ledger-federation")
    ledgers = {s: SiteLedger(run / "ledger", s, simulation_signer(run / "ledger", s)) for s in sites}
    accountants = {s: SiteAccountant("prv") for s in sites}
    for number in range(1, rounds + 1):
        for site, ledger in ledgers.items():
            accountants[site].add(StepBatch(1.0, 0.02, 50))
            ledger.append({"round": number, "steps": 50, "noise_multiplier": 1.0, "sample_rate": 0.02,
                           "sampling": "poisson", "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "prv",
                           "epsilon": accountants[site].epsilon(1e-5), "budget_epsilon": 8.0, "run_id": "7"})
            anchors.append(head_of(site, ledger.verify(), ledger.signer), number, "7")
    return ledgers, anchors


def _rewrite(ledger, entries, signer=None):
    """Write ``entries`` as a valid chain again (hashes recomputed; re-signed when ``signer`` is given)."""
    prev = "0" * 64
    for entry in entries:
        entry["prev_hash"] = prev
        entry.pop("signature", None)
        if signer is not None:
            entry["key_id"] = signer.key_id
        entry["hash"] = prev = entry_hash(entry)
        if signer is not None:
            entry["signature"] = signer.sign(entry["hash"])
    ledger.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _problems(run, site="site-0"):
    audits = {a.site: a for a in audit_run(run)}
    assert audits["site-1"].passed, audits["site-1"].problems
    return " | ".join(audits[site].problems)


def test_an_honest_federation_passes_with_every_head_anchored(tmp_path):
    _federation(tmp_path)
    audits = audit_run(tmp_path)
    assert all(a.passed for a in audits), [a.problems for a in audits]
    assert all(a.anchors == f"contains all 4 heads the coordinator anchored ({tmp_path / 'ledger-federation' / 'anchors.jsonl'})"
               for a in audits)


def test_truncation_is_caught_without_results_json(tmp_path, capsys):
    ledgers, _ = _federation(tmp_path)
    lines = ledgers["site-0"].path.read_text().splitlines()
    ledgers["site-0"].path.write_text("\n".join(lines[:2]) + "\n")  # a valid, signed chain of 2 entries
    assert main(["audit", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "site-0: the head anchored in round 3 is not in the ledger: the ledger has 2 entries but site-0 signed a head at 3" in out
    assert "site-1: PASS" in out


def test_rollback_to_an_older_copy_is_caught(tmp_path):
    ledgers, anchors = _federation(tmp_path, rounds=2)
    backup = ledgers["site-0"].path.read_text()
    for number in (3, 4):  # two more rounds, then the old file is put back
        entries = ledgers["site-0"].verify()
        ledgers["site-0"].append({**{k: v for k, v in entries[-1].items() if k not in ("hash", "prev_hash", "signature")},
                                  "round": number})
        anchors.append(head_of("site-0", ledgers["site-0"].verify(), ledgers["site-0"].signer), number)
        anchors.append(head_of("site-1", ledgers["site-1"].verify(), ledgers["site-1"].signer), number)
    ledgers["site-0"].path.write_text(backup)
    assert "head anchored in round 3 is not in the ledger: the ledger has 2 entries" in _problems(tmp_path)


def test_a_deleted_entry_rechained_and_resigned_by_the_site_itself_is_caught(tmp_path):
    ledgers, _ = _federation(tmp_path)
    ledger = ledgers["site-0"]
    entries = ledger.verify()
    del entries[1]  # round 2 disappears; the site re-signs every entry with its own, valid key
    _rewrite(ledger, entries, ledger.signer)
    problems = _problems(tmp_path)
    assert "signature does not verify" not in problems  # the signatures alone would pass
    assert "the head anchored in round 2 is not in the ledger: entry 2 (round 3) has hash" in problems


def test_reordered_entries_are_caught(tmp_path):
    ledgers, _ = _federation(tmp_path)
    ledger = ledgers["site-0"]
    entries = ledger.verify()
    entries[1], entries[2] = entries[2], entries[1]
    _rewrite(ledger, entries, ledger.signer)
    assert "the head anchored in round 2 is not in the ledger: entry 2 (round 3)" in _problems(tmp_path)


def test_a_history_rewritten_and_rehashed_by_the_site_is_caught(tmp_path):
    ledgers, _ = _federation(tmp_path)
    ledger = ledgers["site-0"]
    entries = ledger.verify()
    for entry in entries:  # claim more noise and a smaller epsilon from round 1 on
        entry["noise_multiplier"] = 2.0
        entry["epsilon"] = SiteAccountant("prv", [StepBatch(2.0, 0.02, 50)] * int(entry["round"])).epsilon(1e-5)
    _rewrite(ledger, entries, ledger.signer)
    assert "the head anchored in round 1 is not in the ledger: entry 1 (round 1) has hash" in _problems(tmp_path)


def test_a_ledger_copied_from_another_site_is_caught(tmp_path):
    ledgers, _ = _federation(tmp_path)
    shutil.copy(ledgers["site-1"].path, ledgers["site-0"].path)
    problems = _problems(tmp_path)
    assert "site-0 entry 1 (round 1) was written by site-1: a ledger copied from another site" in problems
    assert "site-0 entry 1 (round 1): the signature does not verify" in problems
    assert "the head anchored in round 1 is not in the ledger" in problems


def test_a_ledger_signed_with_the_wrong_key_is_caught(tmp_path):
    ledgers, _ = _federation(tmp_path)
    ledger = ledgers["site-0"]
    intruder = simulation_signer(tmp_path / "intruder", "site-0")
    _rewrite(ledger, ledger.verify(), intruder)
    problems = _problems(tmp_path)
    assert "site-0 entry 1 (round 1): the signature does not verify" in problems
    assert "the head anchored in round 1 is not in the ledger" in problems


def test_a_deleted_ledger_and_a_tampered_anchor_log_are_caught(tmp_path):
    ledgers, anchors = _federation(tmp_path)
    ledgers["site-0"].path.unlink()
    assert "the coordinator anchored 4 heads of site-0" in _problems(tmp_path)
    text = anchors.path.read_text().replace('"entries": 3', '"entries": 1')  # hide heads from the log
    anchors.path.write_text(text)
    audits = {a.site: a for a in audit_run(tmp_path)}
    assert any("anchor log is broken or was tampered with" in p for p in audits["coordinator"].problems)


def test_the_coordinator_refuses_a_head_that_goes_back(tmp_path):
    ledgers, anchors = _federation(tmp_path, rounds=3)
    old = head_of("site-0", ledgers["site-0"].verify()[:1], ledgers["site-0"].signer)
    with pytest.raises(AnchorRejected, match="site-0 sent a ledger head at 1 entries .* after the coordinator anchored 3"):
        anchors.append(old, 4)


FAST = ["data.num_sites=2", "data.samples_per_site=120", "data.image_size=16", "federation.rounds=3",
        "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "train.class_balance=none"]


def test_a_site_refuses_to_train_on_a_ledger_behind_its_last_signed_head(tmp_path):
    config = load_config(None, FAST)
    start = adapter_state_dict(build_global_model(config))
    site = Site(config, 0, tmp_path, run_id="42")
    for number in (1, 2):
        reply = site.train(start, number)
    entries = site.ledger.verify()
    assert reply.head.entries == 2 and reply.head.hash == entries[-1]["hash"]
    assert reply.head.verifies_with(site.ledger.signer.public_key)
    assert {e["run_id"] for e in entries} == {"42"} and len({e["config_hash"] for e in entries}) == 1
    assert HeadStore(tmp_path / "heads", "site-0").load() == reply.head
    lines = site.ledger.path.read_text().splitlines()
    site.ledger.path.write_text(lines[0] + "\n")  # cut back to round 1: a valid chain
    with pytest.raises(LedgerRolledBack, match="site-0 refuses to train: the ledger has 1 entries but site-0 signed a head at 2"):
        site.train(start, 3)
    site.ledger.path.unlink()  # a fresh ledger would start the budget again
    with pytest.raises(LedgerRolledBack, match="the ledger has 0 entries"):
        Site(config, 0, tmp_path).train(start, 3)
