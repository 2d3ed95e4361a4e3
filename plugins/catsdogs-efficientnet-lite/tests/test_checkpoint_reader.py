"""The torch-free PyTorch checkpoint reader: round trips, strides/offsets/views, dtypes, errors."""

from __future__ import annotations

import collections
import io
import pickle

import numpy as np
import pytest

from catsdogs_efficientnet_lite.torch_checkpoint import CheckpointFormatError, load, load_state_dict
from catsdogs_efficientnet_lite.weights import checkpoint_path

from conftest import VARIANT_NAMES
from legacy_writer import Global, Storage, Tensor, contiguous, write_legacy


def _write(tmp_path, obj, name="ckpt.pth", **kwargs):
    path = tmp_path / name
    with open(path, "wb") as f:
        write_legacy(f, obj, **kwargs)
    return path


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2, 8).astype(np.float32),
        "bn.num_batches_tracked": np.array(12345678901, dtype=np.int64),  # a 0-d tensor
        "fc.weight": rng.normal(size=(5, 7)).astype(np.float64),
        "half": rng.normal(size=(4, 2)).astype(np.float16),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "ints": np.arange(-3, 3, dtype=np.int32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_round_trip_contiguous(tmp_path, byteorder):
    sample = _sample()
    state = collections.OrderedDict((k, contiguous(f"s{i}", v)) for i, (k, v) in enumerate(sample.items()))
    got = load_state_dict(_write(tmp_path, state, byteorder=byteorder))
    assert list(got) == list(sample)
    for key, expected in sample.items():
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        np.testing.assert_array_equal(got[key], expected)
        assert got[key].flags.c_contiguous and got[key].flags.writeable


def test_round_trip_strides_offsets_shared_storage_and_views(tmp_path):
    flat = np.arange(40, dtype=np.float32)
    root = Storage("root", flat)
    state = {
        # a transposed (4, 5) matrix of elements 0..19: size (5, 4), stride (1, 5)
        "transposed": Tensor(root, 0, (5, 4), (1, 5)),
        # same storage, offset 20, every other element
        "strided": Tensor(root, 20, (10,), (2,)),
        # a broadcast (stride 0) row
        "broadcast": Tensor(root, 3, (3, 4), (0, 1)),
        # legacy (PyTorch < 1.6) view: elements 30..39 of the root, then offset 2 into the view
        "view": Tensor(Storage("root", flat, view=("v", 30, 10)), 2, (2, 3), (3, 1)),
    }
    got = load_state_dict(_write(tmp_path, state))
    np.testing.assert_array_equal(got["transposed"], flat[:20].reshape(4, 5).T)
    np.testing.assert_array_equal(got["strided"], flat[20::2])
    np.testing.assert_array_equal(got["broadcast"], np.tile(flat[3:7], (3, 1)))
    np.testing.assert_array_equal(got["view"], flat[32:38].reshape(2, 3))
    got["strided"][0] = -1  # copies, not views into one buffer
    assert got["transposed"].ravel().min() == 0


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    upper = (values.view(np.uint32) >> 16).astype(np.uint16)
    state = {"w": Tensor(Storage("0", upper, type_name="BFloat16Storage"), 0, (4,), (1,))}
    got = load_state_dict(_write(tmp_path, state))
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], values)


def test_out_of_bounds_tensor_is_rejected(tmp_path):
    state = {"w": Tensor(Storage("0", np.zeros(6, np.float32)), 2, (3, 2), (2, 1))}
    with pytest.raises(CheckpointFormatError, match="reaches element"):
        load_state_dict(_write(tmp_path, state))


def test_truncated_and_foreign_files_are_rejected(tmp_path):
    path = _write(tmp_path, {"w": contiguous("0", np.ones((100,), np.float32))})
    data = path.read_bytes()
    (tmp_path / "short.pth").write_bytes(data[:-10])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load(tmp_path / "short.pth")
    (tmp_path / "junk.pth").write_bytes(b"GIF89a not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        load(tmp_path / "junk.pth")
    wrong_magic = io.BytesIO()
    pickle.dump(12345, wrong_magic, protocol=2)
    (tmp_path / "magic.pth").write_bytes(wrong_magic.getvalue())
    with pytest.raises(CheckpointFormatError, match="magic"):
        load(tmp_path / "magic.pth")


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Global("os", "system"), ("echo pwned > " + str(tmp_path / "pwned"),))

    path = _write(tmp_path, {"w": Evil()})
    with pytest.raises(CheckpointFormatError, match="os.system"):
        load(path)
    assert not (tmp_path / "pwned").exists()


def test_not_a_state_dict(tmp_path):
    path = _write(tmp_path, {"w": contiguous("0", np.ones(3, np.float32)), "epoch": 3})
    assert load(path)["epoch"] == 3
    with pytest.raises(CheckpointFormatError, match="state dict"):
        load_state_dict(path)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_reads_the_shipped_weights(name):
    state = load_state_dict(checkpoint_path(name))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_head.weight"].shape[:1] == (1280,)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
    assert len(state) == {"efficientnet_lite0": 296}.get(name, 386)


# -- against PyTorch itself (only where it is installed) -------------------------------------------
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_matches_torch_load_on_the_shipped_weights(name):
    torch = pytest.importorskip("torch", exc_type=ImportError)
    ours = load_state_dict(checkpoint_path(name))
    theirs = torch.load(str(checkpoint_path(name)), map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = tensor.numpy()
        assert ours[key].shape == expected.shape and ours[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


@pytest.mark.parametrize("zipfile_format", [False, True], ids=["legacy", "zip"])
def test_reads_what_torch_saves(tmp_path, zipfile_format):
    torch = pytest.importorskip("torch", exc_type=ImportError)
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    state = collections.OrderedDict(
        permuted=base.permute(2, 0, 1),          # non-contiguous strides
        sliced=base[1:, ::2, 1],                  # storage offset + strides, shares the storage
        half=torch.linspace(-1, 1, 7).half(),
        bf16=torch.tensor([1.5, -2.0, 3.0]).bfloat16(),
        steps=torch.tensor(7),
        param=torch.nn.Parameter(torch.ones(2, 2)),
    )
    path = tmp_path / "torch.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zipfile_format)
    got = load_state_dict(path)
    for key, tensor in state.items():
        expected = tensor.detach().float().numpy() if key == "bf16" else tensor.detach().numpy()
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
        assert got[key].shape == expected.shape


def test_torch_reads_what_the_test_writer_writes(tmp_path):
    torch = pytest.importorskip("torch", exc_type=ImportError)
    sample = _sample()
    path = _write(tmp_path, {k: contiguous(f"s{i}", v) for i, (k, v) in enumerate(sample.items())})
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    for key, expected in sample.items():
        np.testing.assert_array_equal(loaded[key].numpy(), expected, err_msg=key)
