"""``convert`` as a library call: check paths, plan, validate the data, write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm5conv.checkpoint import MANIFEST_NAME, RemoteFile, checkpoint_files, open_checkpoint
from glm5conv.errors import UsageError
from glm5conv.plan import ConversionPlan, ConvertOptions, plan_conversion
from glm5conv.writer import (
    NoProgress,
    Progress,
    WriteOptions,
    finish_interrupted_commit,
    partial_dir,
    preflight,
    write_output,
)


@dataclass
class ConvertResult:
    status: str  # "converted", "noop", "dry-run" or "complete" (--resume found DST already finished)
    plan: ConversionPlan
    dst: Path
    manifest: dict[str, Any] | None = None
    hub: dict[str, Any] | None = None  # a Hub source: repository, commit, what was (or would be) fetched


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_paths(src: Path, dst: Path, force: bool) -> None:
    """Refuse output locations that could touch the source or clobber other data."""
    src_real, dst_real = src.resolve(), dst.resolve()
    if _inside(dst_real, src_real):
        raise UsageError(f"{dst}: DST is inside SRC ({src}); choose a folder outside the source")
    if _inside(src_real, dst_real):
        raise UsageError(f"{dst}: DST contains SRC ({src}); choose another folder")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise UsageError(f"{dst}: not empty (use --force to replace it)")


def check_in_place(src: Path) -> None:
    """In place rewrites SRC itself: refuse where that would write into a shared store."""
    if not src.is_dir():
        raise UsageError(f"{src}: no such folder")
    linked = [name for name in checkpoint_files(src) if (src / name).is_symlink()]
    if linked:
        raise UsageError(
            f"{src / linked[0]}: is a symlink (a Hugging Face cache snapshot?); converting in place would modify "
            "the files it points to: convert into a new folder instead"
        )


def convert(
    src: Path,
    dst: Path | None,
    options: ConvertOptions,
    *,
    write: WriteOptions | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    remote_files: dict[str, RemoteFile] | None = None,
    source: dict[str, str] | None = None,
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into ``dst`` (or into ``src`` itself with ``write.in_place``).

    Except in place, the source is only read. ``remote_files`` and ``source`` come from a Hub
    source (see glm5conv.hub): files that stay in the repository, and the repository itself.
    """
    src = Path(src)
    write = write or WriteOptions()
    progress = progress or NoProgress()
    if write.in_place:
        if dst is not None and Path(dst).resolve() != src.resolve():
            raise UsageError("--in-place rewrites SRC itself: give no DST")
        dst = src
        check_in_place(src)
    elif dst is None:
        raise UsageError("missing DST (or use --in-place to rewrite SRC itself)")
    else:
        dst = Path(dst)
    if finish_interrupted_commit(dst):
        progress.say(f"{dst}: finished the clean-up of an interrupted conversion")
    # --resume after a run that did finish (a kill after its commit, a CI retry): nothing to do
    complete = write.resume and not partial_dir(dst).exists() and (dst / MANIFEST_NAME).exists()
    if not (write.in_place or complete):
        check_paths(src, dst, write.force)
    checkpoint = open_checkpoint(src, remote_files)
    try:
        plan = plan_conversion(checkpoint, options)
        plan.source = source
        if plan.is_noop:
            return ConvertResult("noop", plan, dst)
        if complete and not write.in_place:
            return ConvertResult("complete", plan, dst)
        if dry_run:
            return ConvertResult("dry-run", plan, dst)
        preflight(plan)
        manifest = write_output(plan, dst, write, progress)
        return ConvertResult("converted", plan, dst, manifest)
    finally:
        checkpoint.close()


def result_json(result: ConvertResult) -> dict[str, Any]:
    """The convert report as one JSON-able document (what ``--json`` prints)."""
    plan = result.plan
    return {
        "status": result.status,
        "source": str(plan.checkpoint.root),
        "dst": str(result.dst),
        "mode": {"to": plan.options.to, "scope": plan.options.scope},
        "mtp_layer": plan.checkpoint.layout.mtp_layer,
        "changes": [
            {"module": c.module, "action": c.action, "before": c.before, "after": c.after} for c in plan.changes
        ],
        "shards_rewritten": plan.rewritten_files,
        "files_unchanged": len(plan.untouched_files),
        "bytes_to_read": plan.bytes_to_read,
        "bytes_to_write": plan.bytes_to_write,
        "config_diff": {
            "exclude_added": plan.exclude_added,
            "exclude_removed": plan.exclude_removed,
            "exclude_rewritten": [list(p) for p in plan.exclude_rewritten],
        },
        "index": None
        if plan.weight_map is None
        else {
            "total_size": plan.total_size(),
            "convention": plan.total_size_convention,
            "rewritten": plan.index_changed,
        },
        "engines_before": [v.to_json() for v in plan.verdicts_before],
        "engines_after": [v.to_json() for v in plan.verdicts_after],
        "notes": plan.notes,
        "hub": result.hub,
    }
