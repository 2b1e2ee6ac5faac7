"""Reading a checkpoint folder: config.json, the index and every shard header, validated.

A checkpoint is either sharded (``model.safetensors.index.json`` + shards) or a single
``model.safetensors``. Files may be symlinks (a Hugging Face cache snapshot points into
``blobs/``): they are read through the links and never written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from glm5conv.architecture import ModelLayout, model_layout
from glm5conv.errors import BadInputError
from glm5conv.shard import ShardHeader, TensorEntry, read_header

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
MANIFEST_NAME = "glm5conv-manifest.json"

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def load_json(path: Path, what: str = "") -> Any:
    """Parse a JSON file, turning every failure into a one-line BadInputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found{what}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.__class__.__name__})") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise BadInputError(f"{path}: key '{key}' appears twice")
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def json_style(path: Path) -> tuple[int | None, bool]:
    """The indent and trailing-newline convention of a JSON file, so rewrites keep its look."""
    text = path.read_text(encoding="utf-8")
    indent: int | None = None
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" ")
        if stripped:
            indent = len(line) - len(stripped) or None
            break
    return indent, text.endswith("\n")


def dump_json(obj: Any, style: tuple[int | None, bool]) -> bytes:
    indent, newline = style
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return (text + ("\n" if newline else "")).encode("utf-8")


def _checked_shard_name(name: Any, tensor: str, index_path: Path) -> str:
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{index_path}: weight_map entry for '{tensor}' is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise BadInputError(f"{index_path}: weight_map path '{name}' is outside the checkpoint folder")
    return str(pure)


@dataclass(frozen=True)
class RemoteFile:
    """A file of the checkpoint that lives in its source repository, not in the folder.

    ``header`` is a shard's header when it was fetched alone (a ranged read), so the plan can
    validate and place the shard's tensors without its data.
    """

    size: int
    sha256: str | None
    header: ShardHeader | None = None


@dataclass
class Checkpoint:
    """A validated view of a checkpoint; nothing here writes."""

    root: Path
    config: dict[str, Any]
    layout: ModelLayout
    index: dict[str, Any] | None
    weight_map: dict[str, str]
    shards: dict[str, ShardHeader]
    remote_files: dict[str, RemoteFile] = field(default_factory=dict)
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def is_sharded(self) -> bool:
        return self.index is not None

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def entry(self, name: str) -> TensorEntry:
        return self.shards[self.weight_map[name]].tensors[name]

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def read_bytes(self, name: str, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes [start, stop) of a tensor's data."""
        shard = self.shards[self.weight_map[name]]
        entry = shard.tensors[name]
        stop = entry.nbytes if stop is None else stop
        fd = self.fd(self.weight_map[name])
        data = os.pread(fd, stop - start, shard.data_start + entry.begin + start)
        if len(data) != stop - start:
            raise BadInputError(f"{shard.path}: truncated while reading '{name}'")
        return data

    def read_tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor (or a block of its rows) as a CPU torch tensor."""
        entry = self.entry(name)
        dtype = TORCH_DTYPES[entry.dtype]
        shape = list(entry.shape)
        if rows is None:
            data = self.read_bytes(name)
        else:
            row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
            data = self.read_bytes(name, rows[0] * row_bytes, rows[1] * row_bytes)
            shape[0] = rows[1] - rows[0]
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def fd(self, shard: str) -> int:
        """A read-only descriptor of a shard, opened once and shared."""
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard].path, os.O_RDONLY)
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_partial(self) -> bool:
        """Some shards are elsewhere (a Hub overlay): their headers are unknown."""
        return any(s.remote for s in self.shards.values())

    def files(self) -> list[str]:
        """Every file of the checkpoint: those here and those elsewhere."""
        return sorted(set(checkpoint_files(self.root)) | set(self.remote_files))

    def tensor_bytes_total(self) -> int | None:
        if self.is_partial:
            return None
        return sum(s.tensor_bytes for s in self.shards.values())

    def file_bytes_total(self) -> int:
        return sum(s.file_size for s in self.shards.values())


def open_checkpoint(path: str | os.PathLike[str], remote_files: dict[str, RemoteFile] | None = None) -> Checkpoint:
    """Open and validate a checkpoint folder (config, index, every shard header).

    ``remote_files`` lists files that live elsewhere (the source repository of a Hub conversion):
    shards among them need not be here. Those whose header came along are validated like local
    ones; the others are only counted. The plan never reads their data.
    """
    root = Path(path)
    remote_files = remote_files or {}
    if not root.exists():
        raise BadInputError(f"{root}: no such folder")
    if not root.is_dir():
        raise BadInputError(f"{root}: not a folder")
    config_path = root / CONFIG_NAME
    config = load_json(config_path, " (a checkpoint folder needs config.json)")
    if not isinstance(config, dict):
        raise BadInputError(f"{config_path}: not a JSON object")
    layout = model_layout(config, config_path)

    index_path = root / INDEX_NAME
    if index_path.exists():
        index = load_json(index_path)
        weight_map_raw = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map_raw, dict) or not weight_map_raw:
            raise BadInputError(f"{index_path}: no weight_map")
        checked: dict[str, str] = {}  # a few hundred shard names for ~10^5 tensors: check each once
        weight_map = {}
        for tensor, shard in weight_map_raw.items():
            if not isinstance(shard, str) or shard not in checked:
                checked[str(shard)] = _checked_shard_name(shard, tensor, index_path)
            weight_map[tensor] = checked[shard]
    elif (root / SINGLE_FILE_NAME).exists() or SINGLE_FILE_NAME in remote_files:
        index = None
        weight_map = {}
    else:
        raise BadInputError(f"{root}: neither {INDEX_NAME} nor {SINGLE_FILE_NAME} found")

    shard_names = sorted(set(weight_map.values())) if index is not None else [SINGLE_FILE_NAME]
    shards: dict[str, ShardHeader] = {}
    for name in shard_names:
        shard_path = root / name
        if not shard_path.is_file():
            if name in remote_files:
                remote = remote_files[name]
                shards[name] = remote.header or ShardHeader(shard_path, -1, None, {}, remote.size)
                continue
            tensor = next((t for t, s in weight_map.items() if s == name), "")
            raise BadInputError(f"{index_path}: weight_map names missing shard '{name}' (for '{tensor}')")
        shards[name] = read_header(shard_path)

    if index is None:
        weight_map = {t: SINGLE_FILE_NAME for t in shards[SINGLE_FILE_NAME].tensors}
    else:
        _check_index_against_shards(index_path, weight_map, shards)
    return Checkpoint(
        root=root, config=config, layout=layout, index=index, weight_map=weight_map, shards=shards,
        remote_files=dict(remote_files),
    )  # fmt: skip


def _check_index_against_shards(index_path: Path, weight_map: dict[str, str], shards: dict[str, ShardHeader]) -> None:
    seen: dict[str, str] = {}
    remote = {name for name, header in shards.items() if header.remote}
    for shard_name, header in shards.items():
        for tensor in header.tensors:
            if tensor in seen:
                raise BadInputError(f"tensor '{tensor}' appears in both {seen[tensor]} and {shard_name}")
            seen[tensor] = shard_name
    for tensor, shard_name in weight_map.items():
        if shard_name in remote:
            continue
        if tensor not in shards[shard_name].tensors:
            where = f" (it is in {seen[tensor]})" if tensor in seen else ""
            raise BadInputError(f"{index_path}: '{tensor}' is mapped to {shard_name} but not stored there{where}")
    unmapped = sorted(t for t in set(seen) - set(weight_map) if seen[t] not in remote)
    if unmapped:
        raise BadInputError(f"{index_path}: '{unmapped[0]}' is stored in {seen[unmapped[0]]} but not in weight_map")


def checkpoint_files(root: Path) -> list[str]:
    """Every file of the folder (relative POSIX paths, symlinks followed), sorted.

    Tool caches (``.cache/``, as huggingface_hub's local-dir downloads leave) are not part of the
    checkpoint and are left out.
    """
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d != ".cache")
        for filename in filenames:
            full = Path(dirpath) / filename
            if full.is_file():
                files.append(full.relative_to(root).as_posix())
    return sorted(files)
