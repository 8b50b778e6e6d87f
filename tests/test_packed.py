"""The adapter on the wire: one array per dtype and a layout; exact round trip, few objects,
and a layout that does not fit its arrays is an error before anything is sliced."""

import json

import numpy as np
import pytest

from fedfm.packed import LayoutError, pack, packed_bytes, unpack


def _adapter():
    rng = np.random.default_rng(0)
    return {"a.lora_A": rng.standard_normal((8, 96)).astype(np.float32),
            "a.lora_B": rng.standard_normal((96, 8)).astype(np.float32),
            "half": rng.standard_normal((3, 2, 2)).astype(np.float16),
            "scalar": np.float32(2.5).reshape(()), "empty": np.zeros((0, 4), np.float32),
            "head.bias": rng.standard_normal(2).astype(np.float32)}


def test_unpack_gives_back_every_tensor_bit_for_bit_in_order():
    adapter = _adapter()
    packed, layout = pack(adapter)
    assert sorted(packed) == ["<f2", "<f4"] and all(a.ndim == 1 for a in packed.values())
    out = unpack(packed, layout)
    assert list(out) == list(adapter)
    for name, value in adapter.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        assert np.array_equal(out[name], value)
    out["a.lora_A"][0, 0] = 99.0  # its own copy, not a view of the message
    assert packed["<f4"][0] != 99.0
    assert packed_bytes(packed, layout) == sum(v.nbytes for v in adapter.values()) + len(layout)


def test_a_packed_adapter_is_a_few_transport_objects_not_one_per_tensor():
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    rng = np.random.default_rng(1)  # distinct tensors: the transport stores equal objects once
    adapter = {f"layer{i}.lora_{ab}": rng.standard_normal((4, 4)).astype(np.float32) for i in range(25) for ab in "AB"}
    packed, _ = pack(adapter)
    loose = ArrayRecord({k: Array(v) for k, v in adapter.items()})
    tight = ArrayRecord({k: Array(v) for k, v in packed.items()})
    assert len(get_all_nested_objects(tight)) <= 3 < 50 < len(get_all_nested_objects(loose))


@pytest.mark.parametrize("tamper, match", [
    (lambda e: e[0].__setitem__(3, 10**9), "does not fit"),
    (lambda e: e[0].__setitem__(2, [-1, 96]), "does not fit"),
    (lambda e: e[0].__setitem__(1, "<f8"), "malformed"),
    (lambda e: e.append(list(e[0])), "does not fit"),  # the same name twice
    (lambda e: e[0].pop(), "malformed"),
])
def test_a_layout_that_does_not_describe_the_arrays_is_refused(tamper, match):
    packed, layout = pack(_adapter())
    entries = json.loads(layout)
    tamper(entries)
    with pytest.raises(LayoutError, match=match):
        unpack(packed, json.dumps(entries))
    with pytest.raises(LayoutError, match="malformed"):
        unpack(packed, "not json")
