"""The manifest a conversion leaves in its output: what changed and the sha256 of every file.

It carries no timestamps or absolute paths, so converting the same source twice gives the
same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glm5conv import __version__
from glm5conv.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, checkpoint_files, load_json

if TYPE_CHECKING:
    from glm5conv.plan import ConversionPlan

MANIFEST_FORMAT = 1


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_manifest(plan: ConversionPlan, folder: Path, source_hashes: dict[str, str]) -> dict[str, Any]:
    rewritten = set(plan.rewritten_files)
    regenerated = {CONFIG_NAME if plan.config_changed else "", INDEX_NAME if plan.index_changed else ""}
    files: dict[str, Any] = {}
    for name in checkpoint_files(folder):
        if name == MANIFEST_NAME or name.startswith("."):
            continue
        status = "rewritten" if name in rewritten else "regenerated" if name in regenerated else "unchanged"
        path = folder / name
        files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size, "status": status}
    return {
        "format": MANIFEST_FORMAT,
        "tool": "glm5conv",
        "version": __version__,
        "mode": {"to": plan.options.to, "scope": plan.options.scope},
        "mtp_layer": plan.checkpoint.layout.mtp_layer,
        "target_engines": list(plan.target_engines),
        "source_shards": source_hashes,
        "changes": [
            {"module": c.module, "action": c.action, "before": c.before, "after": c.after} for c in plan.changes
        ],
        "exclude": {
            "added": plan.exclude_added,
            "removed": plan.exclude_removed,
            "rewritten": [list(pair) for pair in plan.exclude_rewritten],
        },
        "total_size_convention": plan.total_size_convention,
        "files": files,
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
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(f"{path}: size {path.stat().st_size} differs from the manifest's {record.get('size')}")
        elif file_sha256(path) != record.get("sha256"):
            problems.append(f"{path}: sha256 differs from the manifest")
    for name in checkpoint_files(folder):
        if name != MANIFEST_NAME and not name.startswith(".") and name not in listed:
            problems.append(f"{folder / name}: not listed in the manifest")
    return problems
