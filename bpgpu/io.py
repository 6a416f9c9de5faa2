"""Model files: ``save(obj, path)`` and ``load(path, backend="auto")``.

A model file is an ordinary ``.npz`` archive, readable with
``np.load(path, allow_pickle=False)``: the object's arrays (host numpy, so a
model saved from the GPU loads on the CPU and the other way round) plus one
string array ``__bpgpu_metadata__`` holding JSON::

    {"format": "bpgpu-model", "format_version": 1, "kind": "MLP",
     "bpgpu_version": "0.1.0", "dtype": "float32",
     "arrays": {"params": {"shape": [W], "dtype": "float32"}},
     "state": {...}}                 # the kind's own metadata (e.g. the MLP config)

Loading never executes code from the file: pickles are refused, the kind is
looked up in a fixed registry (never imported from a name in the file), and
every inconsistency (truncation, flipped bytes caught by the zip CRC, missing
keys, non-JSON metadata, a wrong format version, arrays that do not match the
architecture) raises ValueError naming the file and the problem.

Saving is atomic: a temporary file in the same directory, flushed and
fsync'ed, then ``os.replace``: a crash leaves the old file or the new one,
never half of one.

Protocol for other savable objects (the scikit-learn estimators use it)::

    obj.__bpgpu_state__() -> (metadata: dict of JSON values, arrays: dict[str, numpy array])
    cls.__bpgpu_from_state__(metadata, arrays, backend) -> obj     (a classmethod)

with the class registered under its kind name by :func:`register` (or listed
in ``_LAZY_KINDS`` when its module needs an optional extra).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

FORMAT = "bpgpu-model"
FORMAT_VERSION = 1
METADATA_KEY = "__bpgpu_metadata__"

# kind -> (class, to_state(obj), from_state(state, arrays, backend))
_KINDS: dict[str, tuple[type, Callable, Callable]] = {}
# kinds whose module needs an optional extra: imported from this fixed table on first load
_LAZY_KINDS = {"MLPClassifier": "bpgpu.estimators", "MLPRegressor": "bpgpu.estimators"}


def register(kind: str, cls: type) -> type:
    """Make ``cls`` (which has the protocol above) savable and loadable under the name ``kind``."""
    for method in ("__bpgpu_state__", "__bpgpu_from_state__"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"{cls.__name__} cannot be registered as {kind!r}: it has no {method}")
    _KINDS[kind] = (cls, lambda obj: obj.__bpgpu_state__(), cls.__bpgpu_from_state__)
    return cls


def _known() -> str:
    return ", ".join(sorted(set(_KINDS) | set(_LAZY_KINDS)))


def _codec_of(obj: Any) -> tuple[str, Callable]:
    for kind, (cls, to_state, _) in _KINDS.items():
        if type(obj) is cls:
            return kind, to_state
    raise TypeError(f"cannot save an object of type {type(obj).__name__}; savable kinds: {_known()}")


def _loader_of(kind: str, path: str) -> Callable:
    if kind not in _KINDS and kind in _LAZY_KINDS:
        importlib.import_module(_LAZY_KINDS[kind])  # a module named in this file's table, never in the model's
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown model kind {kind!r} (known: {_known()})")
    return _KINDS[kind][2]


# --- save -------------------------------------------------------------------------


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (an MLP or a registered estimator) to ``path`` atomically, as described above."""
    from bpgpu import __version__

    path = os.fspath(path)
    kind, to_state = _codec_of(obj)
    state, arrays = to_state(obj)
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        if name == METADATA_KEY or a.dtype.hasobject:
            raise ValueError(f"cannot save array {name!r} of {kind}: reserved name or object dtype")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "bpgpu_version": __version__,
        "dtype": state.get("dtype"),
        "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()},
        "state": state,
    }
    text = json.dumps(metadata, allow_nan=False)  # raises on anything that is not plain JSON
    atomic_write(path, lambda f: np.savez(f, **arrays, **{METADATA_KEY: np.array(text)}))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    A temporary file in the same directory, flushed and fsync'ed, then
    ``os.replace``: a crash or an error inside ``write`` leaves the old file or
    the new one, never half of one. An OSError names ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bpgpu-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, path) from None  # the target, not the temporary file
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror, path) from None  # the target, not the temporary file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- load -------------------------------------------------------------------------


def _read(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every array of the archive, read and CRC-checked, with the metadata parsed and checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it is a single .npy array, not a .npz archive")
        with archive:
            contents = {name: archive[name] for name in archive.files}
    except Exception as exc:  # noqa: BLE001 - a damaged zip raises almost anything (BadZipFile,
        # NotImplementedError, EOFError, struct.error, zlib.error, ValueError...): all mean "corrupt"
        raise ValueError(
            f"{path} is not a readable bpgpu model file (corrupt, truncated, or not an .npz): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if METADATA_KEY not in contents:
        raise ValueError(f"{path}: missing {METADATA_KEY!r}; not a bpgpu model file")
    raw = contents.pop(METADATA_KEY)
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"{path}: {METADATA_KEY!r} must be one string, got dtype {raw.dtype} shape {raw.shape}")
    try:
        metadata = json.loads(str(raw))
    except ValueError as exc:
        raise ValueError(f"{path}: the metadata is not valid JSON ({exc})") from None
    _check_metadata(metadata, contents, path)
    return metadata, contents


def _check_metadata(metadata: Any, arrays: dict[str, np.ndarray], path: str) -> None:
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: the metadata must be a JSON object, got {type(metadata).__name__}")
    missing = [k for k in ("format", "format_version", "kind", "arrays", "state") if k not in metadata]
    if missing:
        raise ValueError(f"{path}: the metadata lacks {', '.join(missing)}")
    if metadata["format"] != FORMAT:
        raise ValueError(f"{path}: format is {metadata['format']!r}, expected {FORMAT!r}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: written in model-file format version {metadata['format_version']!r}; this bpgpu reads "
            f"version {FORMAT_VERSION} (saved by bpgpu {metadata.get('bpgpu_version', '?')})"
        )
    if not isinstance(metadata["kind"], str) or not isinstance(metadata["state"], dict):
        raise ValueError(f"{path}: the metadata's kind must be a string and its state an object")
    listed = metadata["arrays"]
    if not isinstance(listed, dict) or set(listed) != set(arrays):
        raise ValueError(
            f"{path}: the arrays in the file ({', '.join(sorted(arrays)) or 'none'}) do not match the metadata "
            f"({', '.join(sorted(listed)) if isinstance(listed, dict) else listed!r})"
        )
    for name, a in arrays.items():
        spec = listed[name]
        if not isinstance(spec, dict) or spec.get("shape") != list(a.shape) or spec.get("dtype") != a.dtype.str:
            raise ValueError(
                f"{path}: array {name!r} has shape {list(a.shape)} and dtype {a.dtype.str}, the metadata says {spec!r}"
            )


def load(path: str | os.PathLike, backend: Any = "auto") -> Any:
    """Read a model written by :func:`save` and place it on ``backend`` ("auto", "numpy", "cupy", ...)."""
    path = os.fspath(path)
    metadata, arrays = _read(path)
    from_state = _loader_of(metadata["kind"], path)
    try:
        return from_state(metadata["state"], arrays, backend)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"{path}: the {metadata['kind']} stored there is inconsistent: {exc}") from None


# --- the MLP ------------------------------------------------------------------------


def _mlp_state(net: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from bpgpu.backend import to_numpy

    return dict(net.config), {"params": to_numpy(net.params)}  # device → host, explicit


def _mlp_from_state(state: dict[str, Any], arrays: dict[str, np.ndarray], backend: Any) -> Any:
    from bpgpu.network import MLP

    if set(arrays) != {"params"}:
        raise KeyError(f"an MLP file holds exactly one array 'params', found {sorted(arrays)}")
    keys = ("layer_sizes", "hidden", "output", "loss", "reduction", "dtype")
    if set(state) != set(keys):
        raise KeyError(f"the MLP config must have the keys {', '.join(keys)}, found {sorted(state)}")
    net = MLP(**state, backend=backend)
    params = arrays["params"]
    if params.dtype != np.dtype(net.dtype):
        raise ValueError(f"params have dtype {params.dtype} but the config says {net.dtype}")
    if params.shape != (net.n_params,):
        raise ValueError(f"params have shape {params.shape} but MLP {list(net.sizes)} has n_params={net.n_params}")
    net.set_params(params)  # host → the requested backend; also refuses NaN/Inf
    return net


def _register_mlp() -> None:
    from bpgpu.network import MLP

    _KINDS["MLP"] = (MLP, _mlp_state, _mlp_from_state)


_register_mlp()
