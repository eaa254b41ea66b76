"""Read a PyTorch ``.pth`` state dict with numpy only: torch is never imported.

Both layouts that ``torch.save`` writes are understood:

* the legacy (pre-1.6) stream: a pickled magic number, protocol version and sys_info, then the
  state-dict pickle (tensors point at storages by persistent id), then a pickled list of storage
  keys, then per key an int64 element count followed by the raw bytes;
* the zip archive: ``<name>/data.pkl`` with the same kind of pickle and ``<name>/data/<key>`` per
  storage.

Unpickling runs through :class:`_RestrictedUnpickler`, which resolves only the handful of globals a
state dict needs, each to a small function of ours. Anything else (``os.system``,
``builtins.eval``, ...) raises :class:`UnsafePickleError` before it can be called.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["PthFormatError", "UnsafePickleError", "read_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(ValueError):
    """The pickle asked for a global (or persistent object) that a state dict never needs."""


class PthFormatError(ValueError):
    """The file is not a readable ``.pth`` state dict (truncated, corrupt, unexpected layout)."""


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only the element dtype matters."""

    name: str
    dtype: np.dtype


# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32 afterwards.
_BF16 = np.dtype("V2")
_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, np.dtype(dt))
    for name, dt in {
        "FloatStorage": "float32",
        "DoubleStorage": "float64",
        "HalfStorage": "float16",
        "BFloat16Storage": _BF16,
        "LongStorage": "int64",
        "IntStorage": "int32",
        "ShortStorage": "int16",
        "CharStorage": "int8",
        "ByteStorage": "uint8",
        "BoolStorage": "bool",
    }.items()
}


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle; its bytes arrive later (legacy) or from another zip entry."""

    key: str
    stype: _StorageType
    numel: int
    # Legacy files may reference a view of a bigger storage: (root key, element offset).
    root: str
    root_offset: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRef:
    # Trailing arguments (requires_grad, backward_hooks, metadata) do not matter for inference.
    if not isinstance(storage, _StorageRef):
        raise PthFormatError(f"tensor built from {type(storage).__name__}, not a storage")
    try:
        return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))
    except (TypeError, ValueError) as e:
        raise PthFormatError(f"bad tensor geometry: {e}") from e


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data  # an nn.Parameter is its tensor plus requires_grad


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only reachable globals are the entries of ``_SAFE_GLOBALS``."""

    def __init__(self, file: IO[bytes], source: Path, storages: dict[str, _StorageRef] | None) -> None:
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from {self._source}: "
                "a state dict needs only tensors, storages and OrderedDict"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise UnsafePickleError(f"unexpected persistent id in {self._source}")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r:.80} in {self._source}")
        stype, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(stype, _StorageType):
            raise UnsafePickleError(
                f"persistent id names {stype!r:.80}, not a storage type, in {self._source}"
            )
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _StorageRef(key, stype, int(numel), key, 0)
        ref = self._storages[key]
        if view is not None:  # legacy view: (view key, offset into root, view size)
            view_key, offset, view_size = view
            return self._storages.setdefault(
                str(view_key), _StorageRef(str(view_key), stype, int(view_size), key, int(offset))
            )
        return ref


def _load_pickle(f: IO[bytes], source: Path, storages: dict[str, _StorageRef] | None = None) -> Any:
    try:
        return _RestrictedUnpickler(f, source, storages).load()
    except (UnsafePickleError, PthFormatError):
        raise
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        IndexError,
        AttributeError,
        KeyError,
    ) as e:
        raise PthFormatError(f"{source} is truncated or corrupt ({type(e).__name__}: {e})") from e


def _widen_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _materialise(t: _TensorRef, data: dict[str, np.ndarray], source: Path) -> np.ndarray:
    flat = data[t.storage.root][t.storage.root_offset : t.storage.root_offset + t.storage.numel]
    if len(flat) != t.storage.numel:
        raise PthFormatError(f"storage {t.storage.key} in {source} is shorter than declared")
    if len(t.size) != len(t.stride) or t.offset < 0 or any(s < 0 for s in t.stride + t.size):
        raise PthFormatError(f"bad tensor geometry size={t.size} stride={t.stride} in {source}")
    numel = int(np.prod(t.size, dtype=np.int64))
    if numel:
        # as_strided does no bounds checking: a crafted file must not make it read past the storage.
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
        if last >= len(flat):
            raise PthFormatError(f"tensor reaches past its storage {t.storage.key} in {source}")
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset :], shape=t.size, strides=[s * flat.itemsize for s in t.stride], writeable=False
        )
    else:
        view = np.zeros(t.size, flat.dtype)
    out = np.array(view, copy=True, order="C")
    return _widen_bf16(out) if t.storage.stype.dtype == _BF16 else out


def _finish(obj: Any, data: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise PthFormatError(f"{source} holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(v, _TensorRef):
            raise PthFormatError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = _materialise(v, data, source)
    return out


def _read_exact(f: IO[bytes], n: int, source: Path, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise PthFormatError(f"{source} is truncated: {what} needs {n} bytes, found {len(b)}")
    return b


def _read_legacy(f: IO[bytes], source: Path) -> dict[str, np.ndarray]:
    magic = _load_pickle(f, source)
    if magic != _LEGACY_MAGIC:
        raise PthFormatError(f"{source} is not a PyTorch file (bad magic number)")
    protocol = _load_pickle(f, source)
    if protocol != _LEGACY_PROTOCOL:
        raise PthFormatError(f"{source}: unsupported legacy protocol version {protocol!r}")
    sys_info = _load_pickle(f, source)
    order = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"

    storages: dict[str, _StorageRef] = {}
    obj = _load_pickle(f, source, storages)
    keys = _load_pickle(f, source)
    if not isinstance(keys, list):
        raise PthFormatError(f"{source}: storage key list is a {type(keys).__name__}")

    data: dict[str, np.ndarray] = {}
    for key in map(str, keys):
        ref = storages.get(key)
        if ref is None or ref.root != key:
            raise PthFormatError(f"{source}: storage {key!r} listed but never referenced")
        (numel,) = struct.unpack("<q", _read_exact(f, 8, source, f"storage {key} header"))
        if numel != ref.numel:
            raise PthFormatError(f"{source}: storage {key} has {numel} elements, pickle says {ref.numel}")
        dtype = ref.stype.dtype.newbyteorder(order) if ref.stype.dtype.itemsize > 1 else ref.stype.dtype
        raw = _read_exact(f, numel * dtype.itemsize, source, f"storage {key}")
        data[key] = np.frombuffer(raw, dtype=dtype)
    missing = {r.root for r in storages.values()} - data.keys()
    if missing:
        raise PthFormatError(f"{source}: storages {sorted(missing)[:5]} have no data")
    return _finish(obj, data, source)


def _read_zip(source: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(source) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise PthFormatError(f"{source} is a zip but not a torch archive (no single data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        order = "<"
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() == b"big":
            order = ">"
        storages: dict[str, _StorageRef] = {}
        obj = _load_pickle(io.BytesIO(zf.read(pkl[0])), source, storages)
        data: dict[str, np.ndarray] = {}
        for key, ref in storages.items():
            dtype = ref.stype.dtype.newbyteorder(order) if ref.stype.dtype.itemsize > 1 else ref.stype.dtype
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise PthFormatError(f"{source}: storage {key} has no data entry") from None
            if len(raw) < ref.numel * dtype.itemsize:
                raise PthFormatError(f"{source} is truncated: storage {key} is short")
            data[key] = np.frombuffer(raw, dtype=dtype, count=ref.numel)
    return _finish(obj, data, source)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict into ``{name: numpy array}`` without importing torch.

    Raises :class:`UnsafePickleError` when the pickle references any global beyond those a state
    dict needs, and :class:`PthFormatError` for truncated or otherwise unreadable files.
    """
    source = Path(path)
    if zipfile.is_zipfile(source):
        try:
            return _read_zip(source)
        except zipfile.BadZipFile as e:
            raise PthFormatError(f"{source} is a damaged zip archive: {e}") from e
    with open(source, "rb") as f:
        if f.read(1) != b"\x80":
            raise PthFormatError(f"{source} is neither a torch zip archive nor a legacy pickle stream")
        f.seek(0)
        return _read_legacy(f, source)
