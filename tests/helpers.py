"""Small builders for test checkpoints and a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm5conv.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m glm5conv`` as a real process (exit codes, no traceback)."""
    return subprocess.run(
        [sys.executable, "-m", "glm5conv", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def load_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def tree_hashes(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file below root (through symlinks)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def index_of(root: Path) -> dict:
    return json.loads((root / "model.safetensors.index.json").read_text())


def set_config(root: Path, **changes) -> None:
    config = json.loads((root / "config.json").read_text())
    config.update(changes)
    (root / "config.json").write_text(json.dumps(config, indent=4))


def edit_shard(root: Path, shard: str, **tensors: torch.Tensor | None) -> None:
    """Replace (or with None delete) tensors of a shard, keeping the index in step."""
    data, metadata = load_shard(root / shard)
    index = index_of(root)
    for key, value in tensors.items():
        name = key.replace("__", ".")
        if value is None:
            data.pop(name)
            index["weight_map"].pop(name, None)
        else:
            data[name] = value
            index["weight_map"][name] = shard
    save_file(data, root / shard, metadata=metadata)
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def to_single_file(root: Path) -> None:
    """Merge all shards into model.safetensors and drop the index."""
    data: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index_of(root)["weight_map"].values())):
        data.update(load_shard(root / shard)[0])
        (root / shard).unlink()
    (root / "model.safetensors.index.json").unlink()
    save_file(data, root / "model.safetensors", metadata={"format": "pt"})
