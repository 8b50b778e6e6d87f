"""A coordinator killed at any moment of a checkpoint write leaves a checkpoint to resume that
matches itself: its round, its adapter, its history and its byte counts (found with the fault
soak's checkpoint fault, fedfm chaos: the adapter used to be replaced before state.json, and
state.json before results.json)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fedfm.results as results_module
from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.results import RunRecorder


class Killed(BaseException):
    """What SIGKILL does to the checkpoint: nothing after this point is written."""


def _recorder(run_dir):
    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16", "privacy.enabled=false"])
    model = build_global_model(config)
    return RunRecorder(config, run_dir, model, full_model_bytes(model)), adapter_state_dict(model)


def _round(recorder, number, adapter):
    recorder.record_transfer(100, 2)
    recorder.record_round(number, {"site-0": {"num-examples": 10, "train-loss": 0.5}}, {}, {})
    shifted = {k: v + number for k, v in adapter.items()}
    return shifted


@pytest.mark.parametrize("dies_before", ["results.json", "state.json"])
def test_a_checkpoint_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch, dies_before):
    recorder, adapter = _recorder(tmp_path)
    first = _round(recorder, 1, adapter)
    recorder.checkpoint(1, first)
    second = _round(recorder, 2, adapter)
    write_json = results_module.write_json

    def dies(path, payload):
        if path.name == dies_before:
            raise Killed
        write_json(path, payload)

    monkeypatch.setattr(results_module, "write_json", dies)
    with pytest.raises(Killed):
        recorder.checkpoint(2, second)
    monkeypatch.setattr(results_module, "write_json", write_json)

    resumed, _ = _recorder(tmp_path)
    done, loaded = resumed.resume()
    assert done == 1
    assert all(torch.equal(loaded[k], first[k]) for k in first)  # not round 2's adapter under round 1's state
    assert [r["round"] for r in resumed.rounds] == [1]
    assert resumed.bytes_moved == 200  # round 1's transfers only


def test_a_checkpoint_killed_after_state_json_resumes_from_the_new_round_with_its_history(tmp_path, monkeypatch):
    recorder, adapter = _recorder(tmp_path)
    recorder.checkpoint(1, _round(recorder, 1, adapter))
    second = _round(recorder, 2, adapter)
    recorder.checkpoint(2, second)
    resumed, _ = _recorder(tmp_path)
    done, loaded = resumed.resume()
    assert done == 2 and [r["round"] for r in resumed.rounds] == [1, 2]
    assert all(torch.equal(loaded[k], second[k]) for k in second)
    assert resumed.bytes_moved == 400
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("*.safetensors")) == ["adapter-round-2.safetensors", "adapter.safetensors"]
    assert all(torch.equal(t, second[k]) for k, t in load_file(str(tmp_path / "checkpoint" / "adapter.safetensors")).items())


def test_a_checkpoint_of_an_older_version_still_resumes(tmp_path):
    recorder, adapter = _recorder(tmp_path)
    recorder.checkpoint(1, _round(recorder, 1, adapter))
    folder = tmp_path / "checkpoint"
    (folder / "adapter-round-1.safetensors").rename(folder / "adapter.safetensors")
    (folder / "state.json").write_text(json.dumps({"round": 1, "time": 0.0}))  # what older versions wrote
    done, loaded = _recorder(tmp_path)[0].resume()
    assert done == 1 and set(loaded) == set(adapter)
