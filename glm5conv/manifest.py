"""The manifest a conversion leaves in its output: what changed and the sha256 of every file.

It carries no timestamps or absolute paths, so converting the same source twice gives the
same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glm5conv import __version__
from glm5conv.checkpoint import MANIFEST_NAME, checkpoint_files, load_json

if TYPE_CHECKING:
    from glm5conv.plan import ConversionPlan

MANIFEST_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def known_sha256(path: Path, root: Path | None = None) -> str | None:
    """The sha256 of a file when it is known without reading it (huggingface_hub checked it).

    A Hugging Face cache stores large (LFS) files as ``blobs/<sha256>`` behind the snapshot's
    links; a ``local_dir`` download keeps ``.cache/huggingface/download/<file>.metadata`` (commit,
    etag = sha256 for LFS files, timestamp), valid while the file is not newer than it. Read
    here without huggingface_hub's helper, which takes a lock file in (and may delete from) the
    source folder.
    """
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    if root is None:
        return None
    metadata = root / ".cache" / "huggingface" / "download" / (Path(path).relative_to(root).as_posix() + ".metadata")
    try:
        _commit, etag, timestamp = metadata.read_text().splitlines()[:3]
        if _SHA256.fullmatch(etag.strip()) and Path(path).stat().st_mtime - 1 <= float(timestamp):
            return etag.strip()
    except (OSError, ValueError):
        pass
    return None


def build_manifest(plan: ConversionPlan, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest from the writer's record of each output file (sha256, size, status)."""
    return {
        "format": MANIFEST_FORMAT,
        "tool": "glm5conv",
        "version": __version__,
        "mode": {"to": plan.options.to, "scope": plan.options.scope},
        "mtp_layer": plan.checkpoint.layout.mtp_layer,
        "target_engines": list(plan.target_engines),
        "source_shards": {
            name: info["source_sha256"] for name, info in sorted(files.items()) if "source_sha256" in info
        },
        "changes": [
            {"module": c.module, "action": c.action, "before": c.before, "after": c.after} for c in plan.changes
        ],
        "exclude": {
            "added": plan.exclude_added,
            "removed": plan.exclude_removed,
            "rewritten": [list(pair) for pair in plan.exclude_rewritten],
        },
        "total_size_convention": plan.total_size_convention,
        "source": plan.source,
        "overlay": bool(plan.checkpoint.remote_files),
        "files": {
            name: {"sha256": info["sha256"], "size": info["size"], "status": info["status"]}
            for name, info in sorted(files.items())
        },
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    manifest = load_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return {"files": {}, "_invalid": True}
    return manifest


def manifest_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Every way the folder disagrees with its manifest (empty when it matches)."""
    if manifest.get("_invalid"):
        return [f"{folder / MANIFEST_NAME}: not a glm5conv manifest"]
    problems: list[str] = []
    listed = manifest["files"]
    for name, record in sorted(listed.items()):
        if record.get("status") == "in-source-repo":
            continue  # an overlay's unchanged file: in the source repository, checked there
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(f"{path}: size {path.stat().st_size} differs from the manifest's {record.get('size')}")
        elif record.get("sha256") is not None and file_sha256(path) != record["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    for name in checkpoint_files(folder):
        if name != MANIFEST_NAME and not name.startswith(".") and name not in listed:
            problems.append(f"{folder / name}: not listed in the manifest")
    return problems
