import json

import pytest

from fedfm.privacy.accountant import SiteAccountant, StepBatch
from fedfm.privacy.ledger import GENESIS_HASH, LedgerError, SiteLedger


def _record(round_, steps=20, sigma=1.0, q=0.05):
    return {"round": round_, "steps": steps, "noise_multiplier": sigma, "sample_rate": q, "epsilon": 0.0}


def test_entries_chain_and_rebuild_the_accountant(tmp_path):
    ledger = SiteLedger(tmp_path, "site-0")
    for r in range(1, 4):
        ledger.append(_record(r))
    entries = ledger.verify()
    assert [e["round"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert entries[1]["prev_hash"] == entries[0]["hash"]
    rebuilt = ledger.accountant("rdp")
    assert rebuilt.epsilon(1e-5) == SiteAccountant("rdp", [StepBatch(1.0, 0.05, 60)]).epsilon(1e-5)


@pytest.mark.parametrize("field, value", [("steps", 19), ("noise_multiplier", 2.0), ("round", 9)])
def test_modified_entry_is_detected_and_named(tmp_path, field, value):
    ledger = SiteLedger(tmp_path, "site-1")
    for r in range(1, 4):
        ledger.append(_record(r))
    lines = ledger.path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry[field] = value
    lines[1] = json.dumps(entry)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="entry 2 was modified"):
        ledger.verify()


def test_deleted_or_reordered_entries_break_the_chain(tmp_path):
    ledger = SiteLedger(tmp_path, "site-2")
    for r in range(1, 4):
        ledger.append(_record(r))
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(LedgerError, match="entry 2 does not chain"):
        ledger.verify()
    ledger.path.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    with pytest.raises(LedgerError, match="entry 1 does not chain"):
        ledger.verify()


def test_append_leaves_no_temp_files_and_whole_lines(tmp_path):
    ledger = SiteLedger(tmp_path, "site-3")
    ledger.append(_record(1))
    assert [p.name for p in tmp_path.iterdir()] == ["site-3.jsonl"]
    assert ledger.path.read_text().endswith("\n")


def test_changing_any_field_of_any_entry_is_detected_and_named(tmp_path):
    ledger = SiteLedger(tmp_path, "site-4")
    for r in range(1, 4):
        ledger.append(dict(_record(r), delta=1e-5, sampling="poisson", accountant="prv"))
    original = ledger.path.read_text().splitlines()
    for index, line in enumerate(original):
        for field in json.loads(line):
            entry = json.loads(line)
            value = entry[field]
            entry[field] = value + 1 if isinstance(value, (int, float)) else f"{value}x"
            ledger.path.write_text("\n".join(original[:index] + [json.dumps(entry)] + original[index + 1:]) + "\n")
            with pytest.raises(LedgerError, match=f"entry {index + 1}|entry {index + 2}"):
                ledger.verify()
    ledger.path.write_text("\n".join(original) + "\n")
    assert len(ledger.verify()) == 3
