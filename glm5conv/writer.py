"""Carrying out a conversion plan: stream the rewritten shards, link or copy the rest, commit atomically.

Everything is written into a hidden sibling folder (``.DST.glm5conv-partial``) that holds a journal of
the files already complete, and becomes DST with one rename (or, in place, one atomic exchange of
the two folders) at the end. An interrupted run therefore never leaves a DST that looks complete,
and ``resume`` reuses every file the journal lists once its sha256 is checked again. Source files
are only ever opened for reading.

Per rewritten shard the source is read once: unchanged tensors are copied in the kernel
(``copy_file_range``), changed ones decoded or encoded in bounded row blocks, and the source's
sha256 (for the shard's provenance metadata) is computed by a second thread at the same time and
patched into the header's fixed-width placeholder at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from glm5conv import codec
from glm5conv.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, dump_json, json_style
from glm5conv.errors import BadInputError, Glm5convError, OutputError, UsageError
from glm5conv.manifest import build_manifest, file_sha256, known_sha256
from glm5conv.plan import HASH_PLACEHOLDER, SOURCE_HASH_KEY, ConversionPlan, ShardPlan

CHUNK_BYTES = int(os.environ.get("GLM5CONV_CHUNK_BYTES", 32 << 20))  # bound on any block copied or decoded
JOURNAL_NAME = ".glm5conv-journal.json"
PHASE_WRITING = "writing"
PHASE_COMMITTING = "committing"


class Progress(Protocol):
    """What the writer reports; the CLI draws rich progress bars from it."""

    def begin(self, total_bytes: int) -> None: ...
    def file(self, name: str, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def say(self, message: str) -> None: ...


class NoProgress:
    def begin(self, total_bytes: int) -> None:
        pass

    def file(self, name: str, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def say(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class WriteOptions:
    force: bool = False
    copy: bool = False
    resume: bool = False
    in_place: bool = False
    hash_unchanged: bool = False  # also hash unchanged shards for the manifest (reads them all)


def partial_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.glm5conv-partial"


def old_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.glm5conv-old"


def read_journal(folder: Path) -> dict[str, Any] | None:
    path = folder / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        journal = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"phase": PHASE_WRITING, "files": {}, "fingerprint": None}
    return journal if isinstance(journal, dict) else None


def finish_interrupted_commit(dst: Path) -> bool:
    """Complete the clean-up of a run killed after its commit (DST already holds the new checkpoint)."""
    journal = read_journal(dst)
    if journal is None or journal.get("phase") != PHASE_COMMITTING:
        return False
    leftover = partial_dir(dst)
    if leftover.exists() and read_journal(leftover) is None:  # the old folder, exchanged out in place
        shutil.rmtree(leftover)
    shutil.rmtree(old_dir(dst), ignore_errors=True)
    (dst / JOURNAL_NAME).unlink()
    return True


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


def _row_blocks(shape: tuple[int, ...], bytes_per_element: int) -> list[tuple[int, int]]:
    rows = shape[0] if shape else 0
    row_bytes = max(1, math.prod(shape[1:]) * bytes_per_element)
    step = max(1, CHUNK_BYTES // row_bytes)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


class _StreamHasher:
    """sha256 of a file being written, read back from the page cache just behind the writer."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._limit = 0
        self._done = False
        self._cond = threading.Condition()
        self._future = pool.submit(self._run)

    def written(self, position: int) -> None:
        with self._cond:
            self._limit = position
            self._cond.notify()

    def result(self) -> str:
        with self._cond:
            self._done = True
            self._cond.notify()
        try:
            return self._future.result()
        finally:
            os.close(self._fd)

    def _run(self) -> str:
        digest = hashlib.sha256()
        position = 0
        while True:
            with self._cond:
                while position >= self._limit and not self._done:
                    self._cond.wait()
                limit, done = self._limit, self._done
            while position < limit:
                data = os.pread(self._fd, min(limit - position, 8 << 20), position)
                digest.update(data)
                position += len(data)
            if done and position >= self._limit:
                return digest.hexdigest()


class _ShardWriter:
    """Writes one output shard: header, then each tensor's bytes at tracked offsets."""

    def __init__(self, plan: ConversionPlan, shard: ShardPlan, path: Path, progress: Progress) -> None:
        self.checkpoint = plan.checkpoint
        self.shard = shard
        self.path = path
        self.progress = progress
        self._scale_cache: dict[str, bytes] = {}
        self._pos = 0
        self._hasher: _StreamHasher | None = None

    def write(self, pool: ThreadPoolExecutor) -> Future[tuple[str, str]]:
        """Write the shard's bytes; the returned future fsyncs it and gives (source sha256,
        output sha256), so the next shard can start meanwhile.

        When the source's sha256 is known up front (Hugging Face downloads), the header is final
        from the start and the output is hashed while it is written; otherwise a second thread
        hashes the source meanwhile, the digest is patched into the header's placeholder and the
        output is hashed from the page cache while fsync writes it back.
        """
        source_path = self.checkpoint.root / self.shard.name
        known = known_sha256(source_path, self.checkpoint.root)
        source_hash: Future[str] | None = None if known else pool.submit(file_sha256, source_path)
        header = self.shard.header(known or HASH_PLACEHOLDER)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if known:
                self._hasher = _StreamHasher(self.path, pool)
            self._put(fd, header)
            for op in self._ops():
                self._write_op(fd, op)
            if self._pos != self.shard.file_size:
                raise OutputError(f"{self.path}: wrote {self._pos} bytes, planned {self.shard.file_size}")
            source_sha = known or source_hash.result()
            if known:
                output_hash = self._hasher.result
            else:
                key = f'"{SOURCE_HASH_KEY}":"'.encode()
                os.pwrite(fd, source_sha.encode(), header.index(key + HASH_PLACEHOLDER.encode()) + len(key))
                output_hash = pool.submit(file_sha256, self.path).result  # while fsync writes back
        except BaseException:
            if self._hasher is not None:
                self._hasher.result()
            os.close(fd)
            raise

        def finish() -> tuple[str, str]:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return source_sha, output_hash()

        return pool.submit(finish)

    def _ops(self) -> list[tuple]:
        """The tensors as write operations, runs of contiguous source bytes merged into one copy."""
        ops: list[tuple] = []
        for tensor in self.shard.tensors:
            if tensor.source[0] != "copy":
                ops.append(tensor.source)
                continue
            name = tensor.source[1]
            shard = self.checkpoint.shard_of(name)
            offset = self.checkpoint.shards[shard].file_offset(name)
            size = self.checkpoint.entry(name).nbytes
            if ops and ops[-1][0] == "range" and ops[-1][1] == shard and ops[-1][2] + ops[-1][3] == offset:
                ops[-1] = ("range", shard, ops[-1][2], ops[-1][3] + size)
            else:
                ops.append(("range", shard, offset, size))
        return ops

    def _advance(self, nbytes: int) -> None:
        self._pos += nbytes
        self.progress.advance(nbytes)
        if self._hasher is not None:
            self._hasher.written(self._pos)

    def _put(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(fd, view, self._pos)
            self._advance(written)
            view = view[written:]

    def _write_op(self, fd: int, op: tuple) -> None:
        kind = op[0]
        if kind == "range":
            self._copy_range(fd, op[1], op[2], op[3])
        elif kind == "decode":
            self._decode(fd, op[1], op[2])
        elif kind == "encode-weight":
            self._encode(fd, op[1])
        elif kind == "encode-scale":
            self._put(fd, self._scale_cache.pop(op[1]))
        else:
            raise ValueError(kind)

    def _copy_range(self, fd: int, shard: str, offset: int, remaining: int) -> None:
        src_fd = self.checkpoint.fd(shard)
        while remaining:
            count = min(remaining, CHUNK_BYTES)
            try:
                done = os.copy_file_range(src_fd, fd, count, offset, self._pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                done = 0
            if done == 0:  # no in-kernel copy here (or the source ended early): go through a buffer
                data = os.pread(src_fd, count, offset)
                if not data:
                    raise BadInputError(f"{self.checkpoint.shards[shard].path}: truncated at byte {offset}")
                self._put(fd, data)
                done = len(data)
            else:
                self._advance(done)
            offset += done
            remaining -= done

    def _decode(self, fd: int, weight: str, scale: str) -> None:
        checkpoint = self.checkpoint
        what = f"{checkpoint.root / checkpoint.shard_of(weight)}: {weight}"
        for start, stop in _row_blocks(checkpoint.entry(weight).shape, 4):  # 4 output bytes per packed byte
            packed = checkpoint.read_tensor(weight, (start, stop)).view(torch.uint8)
            scales = checkpoint.read_tensor(scale, (start, stop)).view(torch.uint8)
            self._put(fd, codec.decode(packed, scales, what, start).view(torch.uint8).numpy().data)

    def _encode(self, fd: int, weight: str) -> None:
        checkpoint = self.checkpoint
        what = f"{checkpoint.root / checkpoint.shard_of(weight)}: {weight}"
        scales: list[bytes] = []
        for start, stop in _row_blocks(checkpoint.entry(weight).shape, 16):
            packed, scale = codec.encode(checkpoint.read_tensor(weight, (start, stop)), what, start)
            self._put(fd, packed.numpy().data)
            scales.append(scale.numpy().tobytes())
        self._scale_cache[weight] = b"".join(scales)


def _copy_file(src: Path, dst: Path) -> None:
    """A streamed copy; the kernel may share blocks (reflink) where the filesystem can."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        try:
            while offset < size:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), min(size - offset, 1 << 30), offset, offset)
                if done == 0:
                    break
                offset += done
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        if offset < size:
            fin.seek(offset)
            fout.seek(offset)
            shutil.copyfileobj(fin, fout, CHUNK_BYTES)
        fout.flush()
        os.fsync(fout.fileno())


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    if dst.exists():
        if os.path.samefile(real, dst):
            return
        dst.unlink()
    if not copy:
        try:
            os.link(real, dst)
            return
        except OSError:
            pass
    tmp = dst.with_name(dst.name + ".tmp")
    _copy_file(real, tmp)
    os.replace(tmp, dst)


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Journal:
    """The partial folder's record of finished files, rewritten atomically after each one."""

    folder: Path
    fingerprint: str
    in_place: bool
    phase: str = PHASE_WRITING
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self) -> None:
        data = {"phase": self.phase, "fingerprint": self.fingerprint, "in_place": self.in_place, "files": self.files}
        _write_file(self.folder / JOURNAL_NAME, json.dumps(data, indent=1).encode())

    def record(self, name: str, **info: Any) -> None:
        self.files[name] = info
        self.save()


def _start(plan: ConversionPlan, dst: Path, options: WriteOptions, progress: Progress) -> _Journal:
    """Create the partial folder, or take up the one an interrupted run left (``resume``)."""
    tmp = partial_dir(dst)
    fingerprint = plan.fingerprint()
    if tmp.exists():
        journal = read_journal(tmp)
        if journal is None:
            raise OutputError(f"{tmp}: exists and was not made by glm5conv; remove it first")
        if options.resume and journal.get("fingerprint") == fingerprint:
            progress.say(f"resuming the interrupted conversion in {tmp}")
            return _Journal(
                tmp, fingerprint, options.in_place, journal.get("phase", PHASE_WRITING), journal.get("files", {})
            )
        if not options.force:
            if options.resume:
                raise UsageError(
                    f"{tmp}: the interrupted run was for another source, plan or version; use --force to start over"
                )
            raise UsageError(
                f"{tmp}: an interrupted conversion exists; rerun with --resume to complete it or --force to start over"
            )
        shutil.rmtree(tmp)
    elif options.resume:
        progress.say("nothing to resume: starting afresh")
    tmp.mkdir(parents=True)
    journal = _Journal(tmp, fingerprint, options.in_place)
    journal.save()
    return journal


def _reusable(journal: _Journal, name: str) -> dict[str, Any] | None:
    """A finished file of an interrupted run, if it is still what the journal says."""
    info = journal.files.get(name)
    path = journal.folder / name
    if info is None or not path.is_file():
        return None
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        return None
    return info


def write_output(
    plan: ConversionPlan,
    dst: Path,
    options: WriteOptions = WriteOptions(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Carry out ``plan`` into ``dst`` (``dst`` is the source folder itself when in place)."""
    progress = progress or NoProgress()
    checkpoint = plan.checkpoint
    journal = _start(plan, dst, options, progress)
    tmp = journal.folder
    try:
        if journal.phase == PHASE_WRITING:
            _write_files(plan, journal, options, progress)
            manifest = build_manifest(plan, journal.files)
            _write_file(tmp / MANIFEST_NAME, dump_json(manifest, (2, True)))
            journal.phase = PHASE_COMMITTING
            journal.save()
            _fsync_dir(tmp)
        else:
            manifest = json.loads((tmp / MANIFEST_NAME).read_text())
        progress.say("committing")
        checkpoint.close()
        _commit(tmp, dst, options)
        return manifest
    except KeyboardInterrupt:
        raise OutputError(
            f"interrupted; the partial output in {tmp} is kept: rerun with --resume to complete it"
        ) from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else exc.strerror
        raise OutputError(f"{exc.filename or dst}: {reason}; nothing was written to {dst}") from None
    except Glm5convError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(plan: ConversionPlan, journal: _Journal, options: WriteOptions, progress: Progress) -> None:
    checkpoint = plan.checkpoint
    tmp = journal.folder
    progress.begin(plan.bytes_to_write)
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending: list[tuple[ShardPlan, Future[tuple[str, str]]]] = []

        def record_finished(wait: bool) -> None:
            while pending and (wait or pending[0][1].done()):
                shard, future = pending.pop(0)
                source_sha, output_sha = future.result()
                os.replace(tmp / (shard.name + ".tmp"), tmp / shard.name)
                journal.record(
                    shard.name, sha256=output_sha, size=shard.file_size, status="rewritten", source_sha256=source_sha
                )

        for shard in plan.shards:
            progress.file(shard.name, shard.file_size)
            if _reusable(journal, shard.name):
                progress.say(f"{shard.name}: already written by the interrupted run (sha256 checked)")
                progress.advance(shard.file_size)
                continue
            progress.say(f"rewriting {shard.name}")
            pending.append((shard, _ShardWriter(plan, shard, tmp / (shard.name + ".tmp"), progress).write(pool)))
            record_finished(wait=False)
        record_finished(wait=True)

        progress.say(f"{'copying' if options.copy else 'linking'} {len(plan.untouched_files)} unchanged files")
        hashes: dict[str, Future[str | None]] = {}
        for name in plan.untouched_files:
            remote = checkpoint.remote_files.get(name)
            if remote is not None:  # an overlay: the file stays in the source repository
                journal.files[name] = {"sha256": remote.sha256, "size": remote.size, "status": "in-source-repo"}
                continue
            source = checkpoint.root / name
            _link_or_copy(source, tmp / name, options.copy)
            if journal.files.get(name, {}).get("sha256"):
                continue
            known = known_sha256(source, checkpoint.root)
            # Unchanged shards are the bulk of a checkpoint (430 GB for GLM-5): hashed only on request.
            if known is None and (options.hash_unchanged or not name.endswith(".safetensors")):
                hashes[name] = pool.submit(file_sha256, tmp / name)
            else:
                hashes[name] = pool.submit(lambda k=known: k)
        for name, future in hashes.items():
            journal.files[name] = {
                "sha256": future.result(),
                "size": (tmp / name).stat().st_size,
                "status": "unchanged",
            }
        journal.save()

    for name, data, changed in (
        (CONFIG_NAME, lambda: dump_json(plan.config, json_style(checkpoint.config_path)), plan.config_changed),
        (INDEX_NAME, lambda: dump_json(plan.index(), json_style(checkpoint.index_path)), plan.index_changed),
    ):
        if changed:
            _write_file(tmp / name, data())
            journal.record(name, sha256=file_sha256(tmp / name), size=(tmp / name).stat().st_size, status="regenerated")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _commit(tmp: Path, dst: Path, options: WriteOptions) -> None:
    """Make the finished partial folder DST with renames that are each atomic."""
    old = old_dir(dst)
    if options.in_place:
        if not _exchange(tmp, dst):  # fall back to two renames: DST is briefly absent, never mixed
            os.rename(dst, old)
            os.rename(tmp, dst)
        else:
            os.rename(tmp, old)
    elif dst.exists() and any(dst.iterdir()):
        if not options.force:
            raise OutputError(f"{dst}: not empty (use --force to replace it)")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(tmp, dst)
    else:
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)
    (dst / JOURNAL_NAME).unlink()
    _fsync_dir(dst)
