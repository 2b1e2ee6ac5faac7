"""``verify`` as a library call: prove a (converted) checkpoint is consistent and right.

Checks, each reported on its own: the folder is complete, index and shard headers agree,
``total_size`` is exact, the MTP tensors have the form each target engine allocates, the
manifest's hashes match, and with ``against`` every tensor equals the source's (converted
tensors compared with the source decoded or re-encoded by the codec, bit for bit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glm5conv import codec
from glm5conv.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from glm5conv.engines import ENGINE_KEYS, EngineVerdict
from glm5conv.errors import BadInputError, UsageError
from glm5conv.inspection import engine_verdicts
from glm5conv.manifest import manifest_problems, read_manifest
from glm5conv.mtp import FLOAT, MXFP4, ModuleStorage, layer_storage, validate_storage
from glm5conv.writer import PHASE_COMMITTING, partial_dir, read_journal

ROW_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    path: Path
    checks: list[Check] = field(default_factory=list)
    verdicts: list[EngineVerdict] = field(default_factory=list)
    engines: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "engines": [v.to_json() for v in self.verdicts],
            "required_engines": list(self.engines),
        }


def verify_checkpoint(path: Path, against: Path | None = None, engines: tuple[str, ...] | None = None) -> VerifyReport:
    """Verify ``path``; ``engines`` restricts which engines must load the MTP layer."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such folder")
    unknown = [e for e in engines or () if e not in ENGINE_KEYS]
    if unknown:
        raise UsageError(f"--engine {unknown[0]}: unknown engine (known: {', '.join(ENGINE_KEYS)})")
    report = VerifyReport(path)
    journal = read_journal(path)
    if journal is not None and journal.get("phase") != PHASE_COMMITTING:
        report.add("complete", False, f"{path}: partial output of an interrupted glm5conv conversion (incomplete)")
        return report
    manifest = read_manifest(path) if (path / "config.json").exists() else None
    report.add("state", True, _state(path, manifest, journal))
    remote = None
    if manifest is not None and manifest.get("overlay"):
        from glm5conv.hub import overlay_files  # an overlay's other files are read from the Hub

        if against is not None:
            raise UsageError(f"{path}: an overlay; --against compares local files: verify a complete conversion")
        remote = overlay_files(path, manifest)
    try:
        checkpoint = open_checkpoint(path, remote)
    except BadInputError as exc:
        report.add("structure", False, str(exc))
        return report
    with checkpoint:
        report.add(
            "structure",
            True,
            f"{len(checkpoint.weight_map)} tensors in {len(checkpoint.shards)} shard(s); index and headers agree",
        )
        _check_total_size(report, checkpoint, manifest)
        _check_mtp(report, checkpoint, manifest, engines)
        if manifest is None:
            report.add("manifest", True, "no glm5conv manifest (not written by glm5conv convert); hashes not checked")
        else:
            problems = manifest_problems(path, manifest)
            report.add(
                "manifest",
                not problems,
                problems[0] if problems else f"{len(manifest['files'])} files match their sha256",
            )
        if against is not None:
            with open_checkpoint(against) as source:
                _check_against(report, checkpoint, source)
    return report


def _state(path: Path, manifest: dict[str, Any] | None, journal: dict[str, Any] | None) -> str:
    """Which state the folder is in, for users of --in-place and of interrupted runs."""
    if manifest is None:
        state = "not converted by glm5conv (original state)"
    else:
        mode = manifest.get("mode", {})
        state = f"converted by glm5conv {manifest.get('version')} (to={mode.get('to')} scope={mode.get('scope')})"
        if manifest.get("overlay") and manifest.get("source"):
            kept = sum(1 for r in manifest["files"].values() if r.get("status") == "in-source-repo")
            source = manifest["source"]
            state += f"; an overlay: {kept} file(s) stay in {source.get('repo_id')}@{str(source.get('commit'))[:12]}"
    if journal is not None:
        state += "; the conversion was committed but its clean-up was interrupted (finish it by running convert again)"
    pending = read_journal(partial_dir(path))
    # a kill right after the partial folder was made leaves it without a journal: still a started run
    if partial_dir(path).is_dir() and (pending is None or pending.get("in_place")):
        state += f"; an in-place conversion was interrupted before its commit: this is the state before it ({partial_dir(path)} holds the partial new one; rerun with --in-place --resume)"
    return state


def _check_total_size(report: VerifyReport, checkpoint: Checkpoint, manifest: dict[str, Any] | None) -> None:
    if checkpoint.index is None:
        return
    stated = (checkpoint.index.get("metadata") or {}).get("total_size")
    conventions = {"tensor-bytes": checkpoint.tensor_bytes_total(), "file-size": checkpoint.file_bytes_total()}
    conventions = {k: v for k, v in conventions.items() if v is not None}
    if manifest is not None and manifest.get("total_size_convention") in conventions:
        wanted = manifest["total_size_convention"]
        conventions = {wanted: conventions[wanted]}
    matched = [name for name, value in conventions.items() if value == stated]
    expected = " or ".join(f"{v} ({k})" for k, v in conventions.items())
    report.add(
        "total_size",
        bool(matched),
        f"{INDEX_NAME}: total_size {stated} is exact ({matched[0]})"
        if matched
        else f"{INDEX_NAME}: total_size is {stated}, expected {expected}",
    )


def _check_mtp(
    report: VerifyReport, checkpoint: Checkpoint, manifest: dict[str, Any] | None, engines: tuple[str, ...] | None
) -> None:
    layout = checkpoint.layout
    prefix = layout.mtp_prefix()
    if not checkpoint.names_with_prefix(prefix):
        report.add("mtp", False, f"no tensors under '{prefix}': the MTP layer is missing")
        return
    storage = layer_storage(checkpoint)
    try:
        validate_storage(checkpoint, storage)
    except BadInputError as exc:
        report.add("mtp-shapes", False, str(exc))
        return
    report.add("mtp-shapes", True, f"{len(storage)} Linear modules of layer {layout.mtp_layer} have coherent shapes")
    verdicts, _, notes = engine_verdicts(checkpoint)
    report.verdicts = verdicts
    if not verdicts:
        report.add("engines", True, notes[0] if notes else "no engine rules apply")
        return
    required = engines or tuple((manifest or {}).get("target_engines") or ENGINE_KEYS)
    report.engines = required
    failing = [v for v in verdicts if v.engine.key in required and v.status == "fails"]
    flagged = [v for v in verdicts if v.engine.key in required and v.status == "loads-with-flags"]
    if failing:
        detail = f"{failing[0].engine.label}: {failing[0].problems[0].message}"
    else:
        detail = f"{len(required)} engine(s) load the MTP layer"
        if flagged:
            detail += "; " + "; ".join(f"{v.engine.label} needs {' '.join(v.flags)}" for v in flagged)
    report.add("engines", not failing, detail)


def _rows(shape: tuple[int, ...], row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, ROW_BLOCK_BYTES // max(1, row_bytes))
    return [(s, min(shape[0], s + step)) for s in range(0, shape[0], step)]


def _same_file(a: Checkpoint, b: Checkpoint, shard: str) -> bool:
    try:
        return shard in b.shards and os.path.samefile(a.shards[shard].path, b.shards[shard].path)
    except OSError:
        return False


def _check_against(report: VerifyReport, dst: Checkpoint, src: Checkpoint) -> None:
    """Every tensor of ``dst`` equals ``src``: bytes for unchanged ones, codec results for converted ones."""
    prefix = dst.layout.mtp_prefix()
    src_storage, dst_storage = layer_storage(src), layer_storage(dst)
    converted = {m for m in dst_storage if m in src_storage and dst_storage[m].kind != src_storage[m].kind}
    converted_names = {f"{prefix}{m}.weight{s}" for m in converted for s in ("", "_scale")}
    problems: list[str] = []
    compared = linked = 0
    for module in sorted(converted):
        compared += 1
        problem = _compare_converted(dst, src, f"{prefix}{module}.weight", src_storage[module], dst_storage[module])
        if problem:
            problems.append(problem)
    expected_names = set(src.weight_map) - converted_names
    missing = sorted(expected_names - set(dst.weight_map))
    extra = sorted(set(dst.weight_map) - expected_names - converted_names)
    problems += [f"'{n}' is missing from {dst.root}" for n in missing[:1]] + [
        f"'{n}' is not in the source" for n in extra[:1]
    ]
    for name in sorted(expected_names & set(dst.weight_map)):
        if _same_file(dst, src, dst.shard_of(name)) and dst.shard_of(name) == src.shard_of(name):
            linked += 1  # the very same file (a hard link): identical without reading it
            continue
        compared += 1
        d, s = dst.entry(name), src.entry(name)
        if (d.dtype, d.shape) != (s.dtype, s.shape) and not (
            d.shape == s.shape and {d.dtype, s.dtype} <= {"U8", "I8", "F8_E8M0"}
        ):
            problems.append(f"'{name}' is {d.dtype} {list(d.shape)} but {s.dtype} {list(s.shape)} in the source")
            continue
        row_bytes = d.nbytes // d.shape[0] if d.shape and d.shape[0] else d.nbytes
        blocks = _rows(d.shape, row_bytes) if d.shape else [(0, 1)]
        for start, stop in blocks:
            lo, hi = (start * row_bytes, stop * row_bytes) if d.shape else (0, d.nbytes)
            if dst.read_bytes(name, lo, hi) != src.read_bytes(name, lo, hi):
                problems.append(f"'{name}' differs from the source")
                break
    report.add(
        "against-source",
        not problems,
        problems[0]
        if problems
        else f"{compared} tensors compared with {src.root}: identical ({len(converted)} converted, bit-exact); "
        f"{linked} more in files hard-linked to the source's",
    )


def _compare_converted(
    dst: Checkpoint, src: Checkpoint, weight: str, before: ModuleStorage, after: ModuleStorage
) -> str:
    """'' when the converted module equals the source under the codec, else the problem."""
    scale = weight + "_scale"
    out = before.shape[0]
    row_bytes = dst.entry(weight).nbytes // out
    for start, stop in _rows(before.shape, row_bytes * 4):
        if before.kind == MXFP4 and after.kind == FLOAT:
            expected = codec.decode(
                src.read_tensor(weight, (start, stop)).view(torch.uint8),
                src.read_tensor(scale, (start, stop)).view(torch.uint8),
            )
            if not codec.bf16_bits_equal(dst.read_tensor(weight, (start, stop)), expected):
                return f"'{weight}' rows {start}-{stop} differ from the source's dequantized values"
        else:
            packed, scales = codec.encode(src.read_tensor(weight, (start, stop)))
            if not (
                torch.equal(dst.read_tensor(weight, (start, stop)).view(torch.uint8), packed)
                and torch.equal(dst.read_tensor(scale, (start, stop)).view(torch.uint8), scales)
            ):
                return f"'{weight}' rows {start}-{stop} differ from the source quantized as Quark does"
    return ""
