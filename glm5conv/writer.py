"""Carrying out a conversion plan: stream the rewritten shards, link or copy the rest.

Everything is written into a hidden sibling folder and moved to DST with one rename at the
end, so an interrupted or failed run never leaves a DST that looks complete. Source files are
only ever opened for reading.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from glm5conv import codec
from glm5conv.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, dump_json, json_style
from glm5conv.errors import BadInputError, OutputError
from glm5conv.manifest import build_manifest, file_sha256
from glm5conv.plan import ConversionPlan, OutTensor, ShardPlan

CHUNK_BYTES = 32 << 20  # bound on the bytes of any block decoded or copied at once
PARTIAL_MARKER = ".glm5conv-partial"


def partial_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.glm5conv-partial"


def preflight(plan: ConversionPlan) -> None:
    """Validate every FP4 tensor the plan reads before anything is written.

    Scale bytes are checked everywhere (255 is NaN in E8M0); blocks whose scale could
    overflow bf16 (>= 253) are decoded to find out.
    """
    checkpoint = plan.checkpoint
    pairs = list(plan.checks)
    pairs += [(t.source[1], t.source[2]) for s in plan.shards for t in s.tensors if t.source[0] == "decode"]
    for weight, scale in dict.fromkeys(pairs):
        what = f"{checkpoint.root / checkpoint.shard_of(scale)}: {scale}"
        scales = checkpoint.read_tensor(scale).view(torch.uint8)
        codec.check_scales(scales, what)
        if scales.numel() and int(scales.max()) > codec.LARGEST_SAFE_SCALE:
            for start, stop in _row_blocks(checkpoint.entry(weight).shape, 1):
                codec.decode(
                    checkpoint.read_tensor(weight, (start, stop)).view(torch.uint8),
                    scales[start:stop],
                    f"{checkpoint.root / checkpoint.shard_of(weight)}: {weight}",
                    start,
                )


def _row_blocks(shape: tuple[int, ...], bytes_per_element: int) -> Iterator[tuple[int, int]]:
    rows = shape[0] if shape else 0
    row_bytes = max(1, math.prod(shape[1:]) * bytes_per_element)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class _ShardWriter:
    """Writes one output shard: header, then each tensor's bytes at tracked offsets."""

    def __init__(self, plan: ConversionPlan, shard: ShardPlan, path: Path, source_sha256: str) -> None:
        self.checkpoint = plan.checkpoint
        self.shard = shard
        self.path = path
        self.source_sha256 = source_sha256
        self._scale_cache: dict[str, bytes] = {}

    def write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header = self.shard.header(self.source_sha256)
            self._pos = 0
            self._put(fd, header)
            for tensor in self.shard.tensors:
                start = self._pos
                self._write_tensor(fd, tensor)
                if self._pos - start != tensor.nbytes:
                    raise OutputError(
                        f"{self.path}: wrote {self._pos - start} bytes for {tensor.name}, planned {tensor.nbytes}"
                    )
            os.fsync(fd)
        finally:
            os.close(fd)

    def _put(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, self._pos)
            self._pos += written
            view = view[written:]

    def _write_tensor(self, fd: int, tensor: OutTensor) -> None:
        kind = tensor.source[0]
        if kind == "copy":
            self._copy_range(fd, tensor.source[1])
        elif kind == "decode":
            self._decode(fd, tensor.source[1], tensor.source[2])
        elif kind == "encode-weight":
            self._encode(fd, tensor.source[1])
        elif kind == "encode-scale":
            self._put(fd, self._scale_cache.pop(tensor.source[1]))
        else:
            raise ValueError(kind)

    def _copy_range(self, fd: int, name: str) -> None:
        checkpoint = self.checkpoint
        header = checkpoint.shards[checkpoint.shard_of(name)]
        src_fd = checkpoint.fd(checkpoint.shard_of(name))
        offset = header.file_offset(name)
        remaining = header.tensors[name].nbytes
        while remaining:
            count = min(remaining, CHUNK_BYTES)
            try:
                done = os.copy_file_range(src_fd, fd, count, offset, self._pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                done = 0
            if done == 0:  # no in-kernel copy here: go through a buffer
                data = os.pread(src_fd, count, offset)
                if not data:
                    raise BadInputError(f"{header.path}: truncated while reading '{name}'")
                self._put(fd, data)
                done = len(data)
            else:
                self._pos += done
            offset += done
            remaining -= done

    def _decode(self, fd: int, weight: str, scale: str) -> None:
        checkpoint = self.checkpoint
        what = f"{checkpoint.root / checkpoint.shard_of(weight)}: {weight}"
        shape = checkpoint.entry(weight).shape
        for start, stop in _row_blocks(shape, 8):  # 4 output bytes per packed byte, plus temporaries
            packed = checkpoint.read_tensor(weight, (start, stop)).view(torch.uint8)
            scales = checkpoint.read_tensor(scale, (start, stop)).view(torch.uint8)
            out = codec.decode(packed, scales, what, start)
            self._put(fd, out.view(torch.uint8).numpy().data)

    def _encode(self, fd: int, weight: str) -> None:
        checkpoint = self.checkpoint
        what = f"{checkpoint.root / checkpoint.shard_of(weight)}: {weight}"
        shape = checkpoint.entry(weight).shape
        scales: list[bytes] = []
        for start, stop in _row_blocks(shape, 16):
            values = checkpoint.read_tensor(weight, (start, stop))
            packed, scale = codec.encode(values, what, start)
            self._put(fd, packed.numpy().data)
            scales.append(scale.numpy().tobytes())
        self._scale_cache[weight] = b"".join(scales)


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    if not copy:
        try:
            os.link(real, dst)
            return
        except OSError:
            pass
    shutil.copyfile(real, dst)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_output(
    plan: ConversionPlan,
    dst: Path,
    *,
    force: bool = False,
    copy: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Carry out ``plan`` into ``dst``; returns the manifest written there."""
    say = progress or (lambda _msg: None)
    checkpoint = plan.checkpoint
    tmp = partial_dir(dst)
    try:
        if tmp.exists():
            if not (tmp / PARTIAL_MARKER).exists():
                raise OutputError(f"{tmp}: exists and was not made by glm5conv; remove it first")
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / PARTIAL_MARKER).touch()

        source_hashes: dict[str, str] = {}
        for shard in plan.shards:
            say(f"rewriting {shard.name}")
            source_path = checkpoint.root / shard.name
            source_hashes[shard.name] = file_sha256(source_path)
            _ShardWriter(plan, shard, tmp / shard.name, source_hashes[shard.name]).write()
        for name in plan.untouched_files:
            _link_or_copy(checkpoint.root / name, tmp / name, copy)
        if plan.config_changed:
            _write_file(tmp / CONFIG_NAME, dump_json(plan.config, json_style(checkpoint.config_path)))
        if plan.index_changed:
            _write_file(tmp / INDEX_NAME, dump_json(plan.index(), json_style(checkpoint.index_path)))
        say("hashing output files")
        manifest = build_manifest(plan, tmp, source_hashes)
        _write_file(tmp / MANIFEST_NAME, dump_json(manifest, (2, True)))
        (tmp / PARTIAL_MARKER).unlink()
        _fsync_dir(tmp)
        _move_into_place(tmp, dst, force)
        return manifest
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else exc.strerror
        raise OutputError(f"{exc.filename or dst}: {reason}; nothing was written to {dst}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    if dst.exists() and any(dst.iterdir()):
        if not force:
            raise OutputError(f"{dst}: not empty (use --force to replace it)")
        old = dst.parent / f".{dst.name}.glm5conv-old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    _fsync_dir(dst.parent)
