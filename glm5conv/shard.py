"""The safetensors shard format: read and validate a header, build one.

We parse headers ourselves (rather than through ``safe_open``) for two reasons: error messages
must name the file and say exactly what is wrong, and the writer streams byte ranges, so it
needs every tensor's absolute file offset. The rules are the ones the ``safetensors`` reader
enforces (contiguous data, no holes, no trailing bytes), so anything accepted here opens there.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from glm5conv.errors import BadInputError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors reader's own limit
HEADER_ALIGNMENT = 8


class TensorEntry(NamedTuple):
    """One tensor of a shard; ``begin``/``end`` are offsets into the data section.

    A NamedTuple: a real checkpoint has ~10^5 of them and they are built on every open.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, validated shard header; ``tensors`` is in data order."""

    path: Path
    header_len: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorEntry]
    file_size: int

    @property
    def remote(self) -> bool:
        """A placeholder for a shard that is not here (see open_checkpoint's remote_files)."""
        return self.header_len < 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def file_offset(self, name: str) -> int:
        return self.data_start + self.tensors[name].begin

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _reject_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise BadInputError(f"{path}: header names tensor '{key}' twice")
            seen[key] = value
        return seen

    return hook


def read_header(path: Path) -> ShardHeader:
    """Read and validate the header of the shard at ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = f.seek(0, 2)
            f.seek(0)
            if file_size < 8:
                raise BadInputError(f"{path}: too short to be a safetensors file ({file_size} bytes)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > file_size - 8:
                raise BadInputError(
                    f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes)"
                )
            if header_len > MAX_HEADER_BYTES:
                raise BadInputError(f"{path}: header length {header_len} exceeds the safetensors limit")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, not a safetensors file") from None
    except PermissionError:
        raise BadInputError(f"{path}: permission denied") from None
    return parse_header(path, raw, header_len, file_size)


def parse_header(path: Path, raw: bytes, header_len: int, file_size: int) -> ShardHeader:
    """Validate header bytes already read; split from ``read_header`` so tests can feed bytes."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text)
        # json keeps the last of duplicate keys silently; a count mismatch means there may be one
        if isinstance(obj, dict) and len(obj) - ("__metadata__" in obj) != text.count('"data_offsets"'):
            obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise BadInputError(f"{path}: __metadata__ must map strings to strings")
    entries = [_parse_entry(path, name, spec) for name, spec in obj.items()]
    entries.sort(key=itemgetter(3, 4))
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise BadInputError(f"{path}: tensor '{entry.name}' {kind} (data offset {entry.begin})")
        position = entry.end
    data_size = file_size - 8 - header_len
    if position > data_size:
        raise BadInputError(
            f"{path}: truncated: tensor data ends at byte {8 + header_len + position} "
            f"but the file has {file_size} bytes"
        )
    if position < data_size:
        raise BadInputError(f"{path}: {data_size - position} unused bytes after the last tensor")
    return ShardHeader(
        path=path,
        header_len=header_len,
        metadata=metadata,
        tensors={e.name: e for e in entries},
        file_size=file_size,
    )


def _parse_entry(path: Path, name: str, spec: Any) -> TensorEntry:
    try:  # the common, valid case in few operations; anything odd is explained below
        begin, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        dtype = spec["dtype"]
        if (
            type(begin) is int
            and type(end) is int
            and 0 <= begin <= end
            and all(type(d) is int and d >= 0 for d in shape)
            and end - begin == math.prod(shape) * DTYPE_SIZES[dtype]
            and isinstance(spec["shape"], list)
        ):
            return TensorEntry(name, dtype, shape, begin, end)
    except (TypeError, KeyError, ValueError):
        pass
    return _explain_entry(path, name, spec)


def _explain_entry(path: Path, name: str, spec: Any) -> TensorEntry:
    if not isinstance(spec, dict):
        raise BadInputError(f"{path}: tensor '{name}' has no dtype/shape/data_offsets object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise BadInputError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadInputError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise BadInputError(f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}")
    nbytes = offsets[1] - offsets[0]
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    raise BadInputError(f"{path}: tensor '{name}' spans {nbytes} bytes but {dtype} {list(shape)} needs {expected}")


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to lay a tensor out: name, dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order.

    The JSON is compact with ``__metadata__`` first and tensors in data order, padded with
    spaces to 8 bytes as the safetensors writer does, so equal inputs give equal bytes.
    """
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = dict(metadata)
    position = 0
    for spec in specs:
        obj[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        position += spec.nbytes
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw
