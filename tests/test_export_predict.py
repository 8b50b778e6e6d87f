"""``fedfm export`` and ``fedfm predict`` on a run folder built by hand with the library.

The fixture trains one DP round at one synthetic site and writes the folder the way a run does
(config.yaml as ``fedfm simulate`` writes it; adapter/ and results.json by the server's
``RunRecorder.finalize`` from the exchanged adapter), once per ``lora.variant``.
"""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.data import load_site
from fedfm.data.png import write_png
from fedfm.data.types import Split
from fedfm.export import load_merged
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, build_backbone, full_model_bytes, read_spec, unwrap
from fedfm.models.spec import SPEC_ATTR
from fedfm.models.stacking import global_lora_config, global_model as stacked_global_model, stack
from fedfm.site import Site
from fedfm.privacy.accountant import SiteAccountant
from fedfm.results import RunRecorder
from fedfm.run_folder import open_run
from fedfm.training.local import predict_probs, train_round

SIZE = 32
SETTINGS = [
    "model.backbone=efficientnet-lite0", "lora.r=4", "data.num_sites=2", "data.samples_per_site=80",
    f"data.image_size={SIZE}", "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as sites train (train.threads=1): far faster than oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["lora", "ffa", "stacked"])
def run(request, tmp_path_factory):
    """(run folder, config, the trained global model, the site's test split).

    ``stacked``: per-site ranks; the site trains rank 2 and the global adapter is the stack of its update.
    """
    variant = "lora" if request.param == "stacked" else request.param
    ranks = ["lora.site_ranks={site-0: 2, site-1: 6}"] if request.param == "stacked" else []
    config = load_config(None, [*SETTINGS, f"lora.variant={variant}", *ranks])
    site = load_site(config.data, 0)
    server = build_global_model(config)
    if config.lora.stacked:
        local = Site(config, 0, tmp_path_factory.mktemp("ledger"), data=site).fresh_model(adapter_state_dict(server))
        train_round(local, site.train, config.train, config.privacy, SiteAccountant("rdp"), 1.0, seed=0)
        final = stack(adapter_state_dict(server), [(adapter_state_dict(local), 1.0)], config.lora.alpha)
        trained = stacked_global_model(read_spec_of(server), final)
    else:
        trained = build_global_model(config)
        train_round(trained, site.train, config.train, config.privacy, SiteAccountant("rdp"), 1.0, seed=0)
        final = adapter_state_dict(trained)
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    RunRecorder(config, run_dir, server, full_model_bytes(server)).finalize(final, {})
    return run_dir, config, trained.eval(), site.test


def read_spec_of(model):
    return getattr(unwrap(model), SPEC_ATTR)


def _x(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_export_writes_an_adapter_peft_loads(run, tmp_path):
    run_dir, config, trained, _ = run
    assert main(["export", str(run_dir)]) == 0
    out = run_dir / "export"
    spec = read_spec(out)
    assert (spec.num_classes, spec.channels, spec.image_size) == (2, 1, SIZE)
    # a stacked adapter is saved as what it is: one rank per layer at scale 1 (adapter_config.json)
    expected_lora = global_lora_config(config.lora) if config.lora.stacked else config.lora
    assert spec.model == config.model and spec.lora == expected_lora
    assert read_spec(run_dir / "adapter") == spec  # save_adapter wrote it at the end of the run
    loaded = PeftModel.from_pretrained(build_backbone(config.model, 2, 1, SIZE).model, str(out)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_x()), trained(_x()))


def test_export_merge_gives_the_lora_models_logits(run, tmp_path):
    run_dir, config, trained, _ = run
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", "--out", str(out)]) == 0
    description = json.loads((out / "model.json").read_text())
    assert {k: description[k] for k in ("backbone", "num_classes", "channels", "image_size")} == {
        "backbone": "efficientnet-lite0", "num_classes": 2, "channels": 1, "image_size": SIZE,
    }
    merged = load_merged(out)
    assert not any("lora_" in k or "modules_to_save" in k for k in merged.state_dict())
    base = build_backbone(config.model, 2, 1, SIZE).model.eval()
    with torch.no_grad():
        x = _x()
        expected = trained(x)
        assert (base(x) - expected).abs().max() > 1e-3  # the adapter matters, so the check below can fail
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


def _write_pngs(root, split: Split) -> tuple[np.ndarray, dict[str, int]]:
    """Quantised test images as <root>/<label>/<index>.png; returns the images as read back and file -> index."""
    quantised = np.round(np.asarray(split.images) * 255).astype(np.uint8)
    index = {}
    for i, (image, label) in enumerate(zip(quantised, split.labels)):
        path = root / str(int(label)) / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, image[0])
        index[str(path)] = i
    return quantised.astype(np.float32) / 255.0, index


def test_predict_equals_predict_probs_and_its_accuracy(run, tmp_path, capsys):
    run_dir, config, trained, test = run
    images, index = _write_pngs(tmp_path / "images", test)
    expected = predict_probs(trained, Split(images, np.asarray(test.labels)), config.eval.batch_size)
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(tmp_path / "images"), "--labels", "--out", str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out.splitlines()

    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(test) == len(index)
    for row in rows:
        i = index[row["file"]]
        probs = np.array([float(row["prob_0"]), float(row["prob_1"])])
        np.testing.assert_allclose(probs, expected[i], atol=1e-6, rtol=0)
        assert int(row["predicted"]) == int(expected[i].argmax())
        assert int(row["label"]) == int(test.labels[i])
    accuracy = float(np.mean(expected.argmax(axis=1) == np.asarray(test.labels)))
    assert printed[-2] == f"accuracy {accuracy:.4f} on {len(test)} labelled images"
    assert sum(" class " in line for line in printed) == len(test)


def test_predict_reads_one_file_and_averages_rgb_for_a_gray_model(run, tmp_path, capsys):
    run_dir, config, trained, test = run
    gray = np.round(np.asarray(test.images[0, 0]) * 255).astype(np.uint8)
    write_png(tmp_path / "gray.png", gray)
    write_png(tmp_path / "rgb.png", np.repeat(gray[..., None], 3, axis=2))
    expected = predict_probs(trained, Split(gray[None, None].astype(np.float32) / 255.0, np.zeros(1, np.int64)), 8)
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(tmp_path / "gray.png"), str(tmp_path / "rgb.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = f"class {int(expected[0].argmax())}  p [{expected[0, 0]:.4f} {expected[0, 1]:.4f}]"
    assert lines == [f"{tmp_path / 'gray.png'}  {shown}", f"{tmp_path / 'rgb.png'}  {shown}"]


def test_a_run_saved_without_a_model_spec_takes_classes_and_channels_from_its_data(run, tmp_path):
    run_dir, config, _, _ = run
    older = tmp_path / "older"
    shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns("export", "fedfm_model.json"))
    assert read_spec(older / "adapter") is None
    assert open_run(older).spec == read_spec(run_dir / "adapter")


def test_a_run_that_is_not_complete_is_a_clear_error(run, tmp_path, capsys):
    run_dir, *_ = run
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["export", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "is not a completed run" in err and "results.json" in err and "adapter/adapter_model.safetensors" in err

    paused = tmp_path / "paused"
    paused.mkdir()
    for name in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        (paused / name).parent.mkdir(exist_ok=True)
        (paused / name).write_bytes((run_dir / name).read_bytes())
    (paused / "results.json").write_text(json.dumps({"status": "paused"}))
    assert main(["predict", str(paused), str(tmp_path)]) == 2
    assert f"status 'paused' (finish it with fedfm simulate --resume {paused})" in capsys.readouterr().err


def test_predict_refuses_a_folder_that_is_not_a_class_index(run, tmp_path, capsys):
    run_dir, *_ = run
    (tmp_path / "normal").mkdir()
    write_png(tmp_path / "normal" / "a.png", np.zeros((8, 8), np.uint8))
    assert main(["predict", str(run_dir), str(tmp_path / "normal"), "--labels"]) == 2
    assert "is 'normal', not a class index 0..1" in capsys.readouterr().err
