"""Benchmark convert on the full-size synthetic GLM-5-MXFP4 against cp and a naive rewrite, side by side.

Every command runs as its own process under the same page-cache condition:
  warm - the source shards read once beforehand (they sit in the page cache), as right after a download;
  cold - caches dropped first (needs root: writes /proc/sys/vm/drop_caches), as on a fresh machine.
Every command makes its output durable (convert fsyncs; cp is followed by `sync FILE`; the naive
rewrite fsyncs), so each time includes the write-back. Peak RSS comes from wait4.

Rows: `cp` of the shard(s) convert rewrites; `glm5conv convert --scope eh-proj` / `--scope mtp`; the
naive rewrite (safetensors load_file, change, save_file) of the same shards; and the eh_proj decode
alone (6144 x 12288 = 75.5 M values) against a plain memory copy of the same output bytes.

The eh-proj rows run twice: on a plain folder (the source sha256 for the rewritten shard's provenance
must be computed, so the output is hashed after it is written) and on a Hugging Face cache snapshot
(huggingface_hub already knows it, so the output is hashed while it is written).

Usage: python scripts/bench_convert.py [--synthetic DIR] [--work DIR] [--cache warm|cold|both] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAIVE = r"""
import os, sys, torch
from safetensors.torch import load_file, save_file
from glm5conv import codec
src, dst, scope, layer = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
prefix = f"model.layers.{layer}."
for name in sys.argv[5:]:
    tensors = load_file(os.path.join(src, name))
    for key in [k for k in tensors if k.endswith(".weight") and k + "_scale" in tensors]:
        if key.startswith(prefix) and (scope == "mtp" or key == prefix + "eh_proj.weight"):
            tensors[key] = codec.decode(tensors[key], tensors.pop(key + "_scale"))
    save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
    fd = os.open(os.path.join(dst, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    subprocess.run(["sync"], check=True)


def run(cmd: list[str], cache: str, sources: list[Path]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command under the page-cache condition."""
    if cache == "cold":
        drop_caches()
    else:
        warm(sources)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def plan_of(synthetic: Path, scope: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm5conv",
            "convert",
            str(synthetic),
            "/nonexistent/dry",
            "--scope",
            scope,
            "--dry-run",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def decode_alone(repeat: int) -> tuple[float, float]:
    """Best-of-N seconds for decoding eh_proj, and for a memory copy of the same output bytes."""
    import torch

    from glm5conv import codec

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (6144, 6144), dtype=torch.uint8, generator=g)
    scale = torch.randint(110, 135, (6144, 384), dtype=torch.uint8, generator=g)
    out = codec.decode(packed, scale)
    decode, copy = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        codec.decode(packed, scale)
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        out.clone()
        copy.append(time.perf_counter() - t)
    return min(decode), min(copy)


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=Path, default=Path("/tmp/glm5conv-bench/synthetic"))
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder on the same disk (default: next to --synthetic)"
    )
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the table shows the median")
    args = parser.parse_args()

    synthetic: Path = args.synthetic
    work = args.work or synthetic.parent / "work"
    snapshot = synthetic.parent / "hub" / "models--amd--GLM-5-MXFP4-synthetic" / "snapshots" / ("0" * 40)
    for path, extra in ((synthetic, []), (snapshot, ["--hf-cache"])):
        if not (path / "config.json").exists():
            print(f"writing the synthetic checkpoint to {path} ...", file=sys.stderr)
            subprocess.run([sys.executable, "scripts/make_synthetic_glm5.py", str(path), *extra], cwd=REPO, check=True)
    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    if "cold" in caches and not drop_caches():
        print("cannot drop caches here (needs root): cold runs skipped", file=sys.stderr)
        caches.remove("cold")

    layer = json.loads((synthetic / "config.json").read_text())["num_hidden_layers"]
    rows: list[tuple[str, str, float, float, int, int, str]] = []
    for scope, source, layout in (
        ("eh-proj", synthetic, "plain folder"),
        ("eh-proj", snapshot, "HF cache"),
        ("mtp", synthetic, "plain folder"),
    ):
        plan = plan_of(source, scope)
        shards = plan["shards_rewritten"]
        sources = [source / s for s in shards]
        read = plan["bytes_to_read"]
        for cache in caches:
            timings: dict[str, list[tuple[float, float]]] = {"cp": [], "convert": [], "naive": []}
            for _ in range(args.repeat):
                for kind in timings:
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir(parents=True)
                    out = work / "out"
                    if kind == "cp":
                        out.mkdir()
                        cmd = [
                            "sh",
                            "-c",
                            f"cp {' '.join(map(str, sources))} {out}/ && sync {' '.join(str(out / s) for s in shards)}",
                        ]
                    elif kind == "convert":
                        cmd = [
                            sys.executable,
                            "-m",
                            "glm5conv",
                            "convert",
                            str(synthetic),
                            str(out),
                            "--scope",
                            scope,
                            "-q",
                        ]
                    else:
                        out.mkdir()
                        cmd = [sys.executable, "-c", NAIVE, str(source), str(out), scope, str(layer), *shards]
                    timings[kind].append(run(cmd, cache, sources))
            shutil.rmtree(work, ignore_errors=True)
            median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
            written = {"cp": read, "convert": plan["bytes_to_write"], "naive": plan["bytes_to_write"]}
            labels = {
                "cp": f"cp + sync of the {len(shards)} rewritten shard(s)",
                "convert": f"glm5conv convert --scope {scope}",
                "naive": "naive load_file/change/save_file",
            }
            for kind in ("cp", "convert", "naive"):
                wall, rss = median[kind]
                ratio = f"{wall / median['cp'][0]:.2f}x cp, {wall / median['naive'][0]:.2f}x naive"
                rows.append((f"{labels[kind]} ({layout})", cache, wall, rss, read, written[kind], ratio))

    decode, copy = decode_alone(args.repeat + 2)
    values = 6144 * 12288
    print(
        f"\nmachine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
        f"synthetic checkpoint {synthetic} (median of {args.repeat})\n"
    )
    print("| command | page cache | wall s | peak RSS MB | read | written | ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, cache, wall, rss, read, written, ratio in rows:
        print(f"| {label} | {cache} | {wall:.2f} | {rss:.0f} | {fmt_bytes(read)} | {fmt_bytes(written)} | {ratio} |")
    print(
        f"| eh_proj decode alone ({values / 1e6:.1f} M values -> {values * 2 / 1e6:.0f} MB bf16) | - | {decode:.3f} | - | "
        f"{values / 2 / 1e6:.0f} MB | {values * 2 / 1e6:.0f} MB | {values * 2 / decode / 1e9:.2f} GB/s; "
        f"{decode / copy:.1f}x a memory copy of the output ({values * 2 / copy / 1e9:.2f} GB/s) |"
    )


if __name__ == "__main__":
    main()
