"""bp.save / bp.load: round trips, the file format, atomic writes, and every kind of bad file."""

import json
import os
import zipfile

import array_api_strict
import numpy as np
import pytest

import bpgpu as bp
from bpgpu import io as bpio


def small_net(dtype="float32", backend="numpy"):
    return bp.MLP(
        [3, 5, 2],
        hidden="tanh",
        output="softmax",
        loss="cross_entropy",
        dtype=dtype,
        backend=backend,
        init="glorot",
        seed=4,
    )


def write_raw(path, metadata, **arrays):
    """A hand-made archive: metadata as given (dict → JSON, str as is)."""
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    with open(path, "wb") as f:
        np.savez(f, **arrays, __bpgpu_metadata__=np.array(text))


def saved_parts(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["__bpgpu_metadata__"])), {k: z[k] for k in z.files if k != "__bpgpu_metadata__"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", array_api_strict])
def test_round_trip_keeps_config_dtype_and_exact_parameters(tmp_path, dtype, backend):
    net = small_net(dtype)
    X = np.random.default_rng(0).normal(size=(4, 3))
    path = tmp_path / "model.npz"
    bp.save(net, path)
    twin = bp.load(path, backend=backend)
    assert twin.config == net.config and twin.dtype == dtype
    assert twin.backend.name == ("numpy" if backend == "numpy" else "array_api_strict")
    np.testing.assert_array_equal(np.asarray(twin.params), net.params)
    if backend == "numpy":
        np.testing.assert_array_equal(twin.forward(X), net.forward(X))
    else:  # another table (the array-API reference) may round its transcendentals differently
        rtol = 1e-6 if dtype == "float32" else 1e-14
        np.testing.assert_allclose(np.asarray(twin.forward(X)), net.forward(X), rtol=rtol, atol=rtol)


def test_file_is_a_plain_npz_readable_without_pickle(tmp_path):
    net = small_net("float64")
    path = tmp_path / "m.npz"
    bp.save(net, path)
    assert zipfile.is_zipfile(path)
    metadata, arrays = saved_parts(path)  # np.load(allow_pickle=False) reads every member
    assert metadata["format"] == "bpgpu-model" and metadata["format_version"] == 1
    assert metadata["kind"] == "MLP" and metadata["dtype"] == "float64"
    assert metadata["bpgpu_version"] == bp.__version__
    assert metadata["state"]["layer_sizes"] == [3, 5, 2]
    assert set(arrays) == {"params"} and arrays["params"].dtype == np.float64
    assert all(not a.dtype.hasobject for a in arrays.values())


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    first = small_net()
    bp.save(first, path)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        bp.save(small_net("float64"), path)
    assert path.read_bytes() == before  # the old model is intact
    assert os.listdir(tmp_path) == ["m.npz"]  # and the temporary file is gone
    monkeypatch.undo()
    second = small_net("float64")
    bp.save(second, path)
    assert bp.load(path, backend="numpy").dtype == "float64"
    assert os.listdir(tmp_path) == ["m.npz"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_missing_file_and_unsavable_objects(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        bp.load(tmp_path / "nope.npz")
    with pytest.raises(TypeError, match="cannot save an object of type dict"):
        bp.save({"a": 1}, tmp_path / "x.npz")


def test_truncated_files_raise_value_error_naming_the_file(tmp_path):
    path = tmp_path / "m.npz"
    bp.save(small_net(), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    for n in sorted({0, 1, 10, 100, len(data) // 2, len(data) - 30, len(data) - 1}):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut.npz"):
            bp.load(cut, backend="numpy")


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    path = tmp_path / "m.npz"
    net = small_net()
    bp.save(net, path)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.npz"
    caught = 0
    for i in range(0, len(data), 2):  # every other byte: header, npy header, data, directory
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(flipped)
        try:
            twin = bp.load(bad, backend="numpy")
        except ValueError as exc:
            assert "bad.npz" in str(exc)
            caught += 1
        else:  # a byte the zip format does not check (e.g. a timestamp): the model must be unchanged
            assert twin.config == net.config
            np.testing.assert_array_equal(twin.params, net.params)
    assert caught > 0.8 * len(data) / 2


def test_pickled_members_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    net = small_net()
    metadata, arrays = None, None
    bp.save(net, tmp_path / "good.npz")
    metadata, arrays = saved_parts(tmp_path / "good.npz")
    evil = np.empty(1, dtype=object)
    evil[0] = Payload()
    metadata["arrays"]["evil"] = {"shape": [1], "dtype": "|O"}
    path = tmp_path / "evil.npz"
    write_raw(path, metadata, params=arrays["params"], evil=evil)
    with pytest.raises(ValueError, match="evil.npz.*(pickle|Object arrays)"):
        bp.load(path, backend="numpy")
    assert not marker.exists()


def _edited(tmp_path, edit, dtype="float32"):
    """Save a net, let ``edit(metadata, arrays)`` change the parts, write them back."""
    bp.save(small_net(dtype), tmp_path / "good.npz")
    metadata, arrays = saved_parts(tmp_path / "good.npz")
    metadata = edit(metadata, arrays) or metadata
    path = tmp_path / "edited.npz"
    write_raw(path, metadata, **arrays)
    return path


def _shorter_params(metadata, arrays):
    arrays["params"] = arrays["params"][:-1]
    metadata["arrays"]["params"]["shape"] = [arrays["params"].size]


def _wrong_dtype(metadata, arrays):
    arrays["params"] = arrays["params"].astype(np.float64)
    metadata["arrays"]["params"]["dtype"] = "<f8"


def _nan_params(metadata, arrays):
    arrays["params"][3] = np.nan


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m, a: m.update(format_version=2), "format version 2"),
        (lambda m, a: m.update(format="other"), "format is 'other'"),
        (lambda m, a: m.pop("kind") and None, "lacks kind"),
        (lambda m, a: m.update(kind="os.system"), "unknown model kind 'os.system'"),
        (lambda m, a: m["state"].update(layer_sizes=[3, 6, 2]), "n_params"),
        (lambda m, a: m["state"].update(output="bogus"), "bogus"),
        (lambda m, a: m["state"].pop("loss") and None, "keys"),
        (lambda m, a: m["arrays"].update(extra={"shape": [1], "dtype": "<f4"}), "do not match the metadata"),
        (lambda m, a: m["arrays"]["params"].update(shape=[1]), "metadata says"),
        (lambda m, a: [1, 2, 3], "JSON object"),
        (_shorter_params, "shape .* n_params"),
        (_wrong_dtype, "dtype float64 but the config says float32"),
        (_nan_params, "NaN"),
    ],
)
def test_edited_metadata_or_arrays_raise_value_error(tmp_path, edit, match):
    path = _edited(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as info:
        bp.load(path, backend="numpy")
    assert "edited.npz" in str(info.value)


def test_non_json_and_missing_metadata(tmp_path):
    path = tmp_path / "m.npz"
    write_raw(path, "{not json", params=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="m.npz: the metadata is not valid JSON"):
        bp.load(path)
    with open(path, "wb") as f:
        np.savez(f, params=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="m.npz: missing '__bpgpu_metadata__'"):
        bp.load(path)
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a.npy.*not a .npz"):
        bp.load(tmp_path / "a.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz"):
        bp.load(tmp_path / "text.npz")


class _Toy:
    """A minimal object with the save protocol, as the estimators implement it."""

    def __init__(self, scale, weights):
        self.scale, self.weights = scale, weights

    def __bpgpu_state__(self):
        return {"scale": self.scale, "dtype": "float64"}, {"weights": self.weights}

    @classmethod
    def __bpgpu_from_state__(cls, state, arrays, backend):
        return cls(state["scale"], arrays["weights"])


def test_registered_kinds_round_trip_through_the_protocol(tmp_path, monkeypatch):
    monkeypatch.setitem(bpio._KINDS, "Toy", None)
    bpio.register("Toy", _Toy)
    path = tmp_path / "toy.npz"
    bp.save(_Toy(2.5, np.arange(4.0)), path)
    back = bp.load(path)
    assert isinstance(back, _Toy) and back.scale == 2.5
    np.testing.assert_array_equal(back.weights, np.arange(4.0))
    with pytest.raises(TypeError, match="no __bpgpu_state__"):
        bpio.register("Nothing", object)


def test_saving_a_trained_net_keeps_predictions(tmp_path):
    X = np.random.default_rng(1).normal(size=(20, 3))
    T = np.eye(2)[(X[:, 0] > 0).astype(int)]
    net = small_net("float64")
    bp.fit(net, X, T, optimizer="adam", learning_rate=0.05, epochs=20, progress=False)
    bp.save(net, tmp_path / "trained.npz")
    np.testing.assert_array_equal(bp.load(tmp_path / "trained.npz", backend="numpy").forward(X), net.forward(X))


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=bp.gpu_status().reason)
def test_gpu_model_loads_on_the_cpu_and_back(tmp_path):
    net = small_net("float32", backend="cupy")
    bp.save(net, tmp_path / "gpu.npz")
    cpu = bp.load(tmp_path / "gpu.npz", backend="numpy")
    np.testing.assert_array_equal(cpu.params, bp.to_numpy(net.params))
    bp.save(cpu, tmp_path / "cpu.npz")
    gpu = bp.load(tmp_path / "cpu.npz", backend="cupy")
    assert gpu.backend.name == "cupy"
    np.testing.assert_array_equal(bp.to_numpy(gpu.params), cpu.params)


def test_a_net_on_another_namespace_saves_host_arrays(tmp_path):
    net = small_net("float64", backend=array_api_strict)
    bp.save(net, tmp_path / "strict.npz")
    back = bp.load(tmp_path / "strict.npz", backend="numpy")
    assert isinstance(back.params, np.ndarray)
    np.testing.assert_array_equal(back.params, np.asarray(net.params))
