"""A GGUF file as plain, editable data, and its byte-exact serializer.

The fuzzer needs files the `gguf` package's writer refuses to make (a tensor count
that lies, a string whose length runs past the end, a 0-D tensor, a type id llama.cpp
never defined), so it keeps its own ~100-line model of the format (GGUF v3):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: str, type: u32, value)            str = u64 length + bytes
    n_tensors x (name: str, n_dims: u32, ne[n_dims]: u64, ggml type: u32, offset: u64)
    padding to `general.alignment` (32) | tensor data, each at its aligned offset

A value is kept as raw bytes when copied from another file (the 49k-token tokenizer
of the embedded model, read once), so copying costs nothing and mutating one key
never re-encodes the others.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field
from typing import Any

# gguf value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}

# ggml tensor types: (id, bytes per block, elements per block)
GGML_TYPES = {
    "F32": (0, 4, 1), "F16": (1, 2, 1), "Q4_0": (2, 18, 32), "Q4_1": (3, 20, 32), "Q5_0": (6, 22, 32),
    "Q5_1": (7, 24, 32), "Q8_0": (8, 34, 32), "Q8_1": (9, 36, 32), "Q2_K": (10, 84, 256),
    "Q3_K": (11, 110, 256), "Q4_K": (12, 144, 256), "Q5_K": (13, 176, 256), "Q6_K": (14, 210, 256),
    "Q8_K": (15, 292, 256), "I8": (24, 1, 1), "I16": (25, 2, 1), "I32": (26, 4, 1), "I64": (27, 8, 1),
    "F64": (28, 8, 1), "BF16": (30, 2, 1),
}
TYPE_NAMES = {v[0]: k for k, v in GGML_TYPES.items()}
ALIGNMENT = 32


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value: Any, sub_type: int | None = None) -> bytes:
    """The bytes of one value of type `vtype` (for ARR: u32 sub type, u64 count, items)."""
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        items = list(value)
        return struct.pack("<IQ", sub_type, len(items)) + b"".join(encode_value(sub_type, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


@dataclass
class KV:
    key: str | bytes
    vtype: int
    raw: bytes  # the encoded value (without key and type)

    @classmethod
    def of(cls, key: str, vtype: int, value: Any, sub_type: int | None = None) -> "KV":
        return cls(key, vtype, encode_value(vtype, value, sub_type))

    def encode(self) -> bytes:
        return _str(self.key) + struct.pack("<I", self.vtype) + self.raw


@dataclass
class Tensor:
    name: str | bytes
    ggml_type: int
    ne: list[int]          # GGUF order: ne[0] is the row length (numpy's last axis)
    data: bytes
    offset: int | None = None  # None: placed after the previous tensor, aligned


def tensor_nbytes(ggml_type: int, ne: list[int]) -> int:
    _, size, block = GGML_TYPES[TYPE_NAMES[ggml_type]]
    n = math.prod(ne) if ne else 1
    return (n // block) * size


@dataclass
class GGUF:
    kvs: list[KV] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    magic: bytes = b"GGUF"
    n_tensors: int | None = None   # None: the true count; else what the header claims
    n_kv: int | None = None
    layout: dict = field(default_factory=dict)  # filled by to_bytes()

    # ---- key/values
    def index(self, key: str) -> int:
        return next((i for i, kv in enumerate(self.kvs) if kv.key == key), -1)

    def get(self, key: str) -> KV | None:
        i = self.index(key)
        return self.kvs[i] if i >= 0 else None

    def set(self, key: str, vtype: int, value: Any, sub_type: int | None = None) -> None:
        kv = KV.of(key, vtype, value, sub_type)
        i = self.index(key)
        if i >= 0:
            self.kvs[i] = kv
        else:
            self.kvs.append(kv)

    def set_raw(self, key: str, vtype: int, raw: bytes) -> None:
        i = self.index(key)
        kv = KV(key, vtype, raw)
        if i >= 0:
            self.kvs[i] = kv
        else:
            self.kvs.append(kv)

    def drop(self, key: str) -> bool:
        i = self.index(key)
        if i >= 0:
            del self.kvs[i]
        return i >= 0

    def rename_prefix(self, old: str, new: str) -> None:
        for kv in self.kvs:
            if isinstance(kv.key, str) and kv.key.startswith(old + "."):
                kv.key = new + kv.key[len(old):]

    # ---- tensors
    def tensor(self, name: str) -> Tensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    def add_array(self, name: str, arr) -> None:
        """A numpy float32/float16/... array, written in GGUF dimension order."""
        import numpy as np

        arr = np.ascontiguousarray(arr)
        type_name = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
                     np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
                     np.dtype(np.int64): "I64"}[arr.dtype]
        self.tensors.append(Tensor(name, GGML_TYPES[type_name][0], list(reversed(arr.shape)), arr.tobytes()))

    # ---- bytes
    def to_bytes(self) -> bytes:
        al = self.alignment()
        infos, blobs, pos = [], [], 0
        for t in self.tensors:
            off = t.offset
            if off is None:
                off = pos = _align(pos, al)
            infos.append(_str(t.name) + struct.pack("<I", len(t.ne)) + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.ne)
                         + struct.pack("<IQ", t.ggml_type & 0xFFFFFFFF, off & (2**64 - 1)))
            if t.offset is None:
                blobs.append((off, t.data))
                pos = off + len(t.data)
        n_t = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        kv_bytes = b"".join(kv.encode() for kv in self.kvs)
        head = (self.magic + struct.pack("<IQQ", self.version & 0xFFFFFFFF, n_t & (2**64 - 1), n_kv & (2**64 - 1))
                + kv_bytes + b"".join(infos))
        # where the parts start, for mutations aimed at one of them
        self.layout = {"kv": 24, "tensor_info": 24 + len(kv_bytes), "data": _align(len(head), al)}
        out = bytearray(head)
        out += b"\0" * (_align(len(out), al) - len(out))
        base = len(out)
        for off, data in blobs:
            out += b"\0" * (base + off - len(out))
            out += data
        return bytes(out)

    def alignment(self) -> int:
        kv = self.get("general.alignment")
        if kv is not None and kv.vtype == U32 and len(kv.raw) == 4:
            a = struct.unpack("<I", kv.raw)[0]
            if a and a & (a - 1) == 0 and a <= 1 << 16:
                return a
        return ALIGNMENT

    def write(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ---------------------------------------------------------------- reading
class _Cursor:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def skip_value(self, vtype: int) -> None:
        if vtype == STR:
            self.string()
        elif vtype == ARR:
            sub, n = self.take("<I"), self.take("<Q")
            if sub in _SCALAR:
                self.pos += struct.calcsize(_SCALAR[sub]) * n
            else:
                for _ in range(n):
                    self.skip_value(sub)
        else:
            self.pos += struct.calcsize(_SCALAR[vtype])


def read_kvs(path: str) -> list[KV]:
    """Every key/value of a GGUF file, values kept as raw bytes."""
    with open(path, "rb") as f:
        head = f.read(24)
        magic, _, _, n_kv = struct.unpack("<4sIQQ", head)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        buf = head + f.read(64 << 20)  # the metadata of a small model fits easily
    c = _Cursor(buf, 24)
    out = []
    for _ in range(n_kv):
        key = c.string().decode("utf-8")
        vtype = c.take("<I")
        start = c.pos
        c.skip_value(vtype)
        out.append(KV(key, vtype, buf[start:c.pos]))
    return out


def decode_str_array(raw: bytes) -> list[bytes]:
    c = _Cursor(raw)
    sub, n = c.take("<I"), c.take("<Q")
    assert sub == STR
    return [c.string() for _ in range(n)]


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> tuple[KV, ...]:
    """The tokenizer (and chat template) key/values of the embedded default model."""
    from .. import models

    return tuple(kv for kv in read_kvs(str(models.embedded_default_path()))
                 if isinstance(kv.key, str) and kv.key.startswith("tokenizer."))


def n_vocab(kvs) -> int:
    kv = next(kv for kv in kvs if kv.key == "tokenizer.ggml.tokens")
    return struct.unpack_from("<Q", kv.raw, 4)[0]
