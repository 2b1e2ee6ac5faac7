"""Kills, resumes, a full disk and in-place conversion: never a DST that looks valid and is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from glm5conv.verify import verify_checkpoint
from glm5conv.writer import JOURNAL_NAME, partial_dir
from tests.helpers import edit_shard, run_cli, tree_hashes

TRIALS = 24
ENV = {"GLM5CONV_CHUNK_BYTES": str(1 << 20)}  # many small writes: kills land mid-file


def contents(root: Path) -> dict[str, str]:
    """sha256 of every checkpoint file (hidden bookkeeping files left out)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def padded(tmp_path_factory, bundled: Path) -> Path:
    """The bundled checkpoint with 48 MB of extra tensors in the rewritten shards, so writing takes a while."""
    root = tmp_path_factory.mktemp("padded") / "src"
    shutil.copytree(bundled, root)
    for shard in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        filler = torch.randint(0, 256, (24, 1 << 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        edit_shard(root, shard, **{f"model__filler__{shard[6:11]}": filler})
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = sum((root / s).stat().st_size for s in set(index["weight_map"].values()))
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return root


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "glm5conv", *map(str, args), "-q"],
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_while_writing(proc: subprocess.Popen, watch: Path, window: float, rng: random.Random) -> None:
    """SIGKILL at a random moment after ``watch`` (the partial folder) appears."""
    deadline = time.monotonic() + 120
    while not watch.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, window))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def write_window(args: list[str], watch: Path, reset=None) -> float:
    """Seconds from the partial folder's appearance to the commit (DST appears), in a warm run."""
    dst = watch.parent / watch.name[1 : -len(".glm5conv-partial")]
    times = []
    for _ in range(2):  # the second run is warm, like the trials
        shutil.rmtree(dst, ignore_errors=True)
        if reset is not None:
            reset()
        proc = start(args)
        while not watch.exists() and proc.poll() is None:
            time.sleep(0.001)
        t = time.monotonic()
        while not (dst / "glm5conv-manifest.json").exists() and proc.poll() is None:
            time.sleep(0.001)
        times.append(time.monotonic() - t)
        assert proc.wait() == 0, proc.stderr.read().decode()
    return min(times)


def test_sigkill_then_resume(tmp_path: Path, padded: Path) -> None:
    before = tree_hashes(padded)
    reference = tmp_path / "reference"
    window = write_window(["convert", padded, reference, "--scope", "mtp"], partial_dir(reference))
    expected = contents(reference)
    rng = random.Random(7)
    outcomes = {"no DST": 0, "complete": 0}
    for trial in range(TRIALS):
        dst = tmp_path / f"out{trial}"
        kill_while_writing(start(["convert", padded, dst, "--scope", "mtp"]), partial_dir(dst), window * 1.2, rng)
        if dst.exists():  # killed after the commit: it must be complete and exactly right
            assert verify_checkpoint(dst, against=padded).ok
            assert contents(dst) == expected
            outcomes["complete"] += 1
        else:
            outcomes["no DST"] += 1
        resumed = subprocess.run(
            [sys.executable, "-m", "glm5conv", "convert", padded, dst, "--scope", "mtp", "--resume", "-q"],
            capture_output=True,
            text=True,
            env={**os.environ, **ENV},
        )
        assert resumed.returncode == 0, resumed.stderr
        assert contents(dst) == expected, f"trial {trial}"
        assert not partial_dir(dst).exists() and not (dst / JOURNAL_NAME).exists()
        shutil.rmtree(dst)
    assert outcomes["no DST"] >= TRIALS // 2, outcomes  # most kills land while writing
    assert tree_hashes(padded) == before


def test_partial_output_is_reported_and_not_silently_reused(tmp_path: Path, padded: Path, capsys) -> None:
    dst = tmp_path / "out"
    window = write_window(["convert", padded, tmp_path / "ref"], partial_dir(tmp_path / "ref"))
    kill_while_writing(start(["convert", padded, dst]), partial_dir(dst), window * 0.3, random.Random(3))
    assert not dst.exists() and partial_dir(dst).exists()
    report = verify_checkpoint(partial_dir(dst))
    assert not report.ok and "incomplete" in report.checks[0].detail
    code, _, err = run_cli(["convert", padded, dst], capsys)
    assert code == 2 and "rerun with --resume" in err
    code, _, _ = run_cli(["convert", padded, dst, "--force", "-q"], capsys)
    assert code == 0 and contents(dst) == contents(tmp_path / "ref")


def test_resume_refuses_a_different_plan(tmp_path: Path, padded: Path, capsys) -> None:
    dst = tmp_path / "out"
    window = write_window(["convert", padded, tmp_path / "ref", "--scope", "mtp"], partial_dir(tmp_path / "ref"))
    kill_while_writing(
        start(["convert", padded, dst, "--scope", "mtp"]), partial_dir(dst), window * 0.3, random.Random(5)
    )
    code, _, err = run_cli(["convert", padded, dst, "--scope", "eh-proj", "--resume"], capsys)
    assert code == 2 and "was for another source, plan or version" in err


def test_disk_full_gives_a_clear_error_and_leaves_nothing(tmp_path: Path, bundled: Path) -> None:
    limit = 150_000  # the rewritten shard 2 is ~188 KB: its write fails with EFBIG

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    dst = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "glm5conv", "convert", bundled, dst],
        capture_output=True,
        text=True,
        preexec_fn=limited,
    )
    assert proc.returncode == 3
    assert "no space left on device; nothing was written" in proc.stderr and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_in_place(tmp_path: Path, padded: Path, capsys) -> None:
    reference = tmp_path / "reference"
    convert(padded, reference, ConvertOptions())
    target = tmp_path / "target"
    shutil.copytree(padded, target)
    code, out, _ = run_cli(["convert", target, "--in-place"], capsys)
    assert code == 0 and "wrote" in out
    assert contents(target) == contents(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "target"]
    report = verify_checkpoint(target, against=padded)
    assert report.ok and report.checks[0].detail.startswith("converted by glm5conv")


def test_in_place_survives_sigkill_in_old_or_new_state(tmp_path: Path, padded: Path) -> None:
    reference = tmp_path / "reference"
    convert(padded, reference, ConvertOptions())
    new, old = contents(reference), contents(padded)
    target = tmp_path / "target"
    shutil.copytree(padded, target)
    window = write_window(
        ["convert", target, "--in-place"], partial_dir(target), lambda: shutil.copytree(padded, target)
    )
    rng = random.Random(11)
    states = {"old": 0, "new": 0}
    for _ in range(TRIALS):
        shutil.rmtree(target)
        shutil.copytree(padded, target)
        kill_while_writing(start(["convert", target, "--in-place"]), partial_dir(target), window * 1.2, rng)
        state = contents(target)
        assert state in (old, new), "a mix of old and new files"
        report = verify_checkpoint(target)
        said = report.checks[0].detail
        if state == old:
            states["old"] += 1
            assert said.startswith("not converted by glm5conv")
            if partial_dir(target).exists():
                assert "interrupted before its commit" in said
        else:
            states["new"] += 1
            assert report.ok and said.startswith("converted by glm5conv")
        resumed = subprocess.run(
            [sys.executable, "-m", "glm5conv", "convert", target, "--in-place", "--resume", "-q"],
            capture_output=True,
            text=True,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert contents(target) == new and not partial_dir(target).exists()
    assert states["old"] >= TRIALS // 2, states


def test_in_place_refuses_a_hugging_face_snapshot(tmp_path: Path, bundled: Path, capsys) -> None:
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    for path in bundled.iterdir():
        (snapshot / path.name).symlink_to(path)
    code, _, err = run_cli(["convert", snapshot, "--in-place"], capsys)
    assert code == 2 and "is a symlink" in err


def test_resume_after_a_finished_run_is_fine(tmp_path: Path, bundled: Path, capsys) -> None:
    convert(bundled, tmp_path / "out", ConvertOptions())
    code, out, _ = run_cli(["convert", bundled, tmp_path / "out", "--resume"], capsys)
    assert code == 0 and "already complete" in out


def test_rss_does_not_grow_with_shard_size(tmp_path: Path, bundled: Path) -> None:
    """Unchanged bytes go through the kernel, changed ones in bounded blocks: a 24x larger shard, same RSS."""

    def peak_rss(src: Path, dst: Path) -> int:
        # VmHWM read by the child itself: wait4's ru_maxrss would include this (large) test process
        # as it was when it forked.
        report = tmp_path / f"{dst.name}.hwm"
        code = (
            "import runpy, sys\n"
            f"sys.argv = ['glm5conv', 'convert', {str(src)!r}, {str(dst)!r}, '--scope', 'mtp', '-q']\n"
            "try:\n    runpy.run_module('glm5conv', run_name='__main__')\n"
            "finally:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            f"    open({str(report)!r}, 'w').write(hwm)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        return int(report.read_text()) * 1024

    small = peak_rss(bundled, tmp_path / "small")
    big_src = tmp_path / "big-src"
    shutil.copytree(bundled, big_src)
    filler = torch.zeros(384, 1 << 20, dtype=torch.uint8)  # 384 MB in a shard that gets rewritten
    edit_shard(big_src, "model-00003-of-00003.safetensors", model__filler=filler)
    del filler
    index = json.loads((big_src / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = sum((big_src / s).stat().st_size for s in set(index["weight_map"].values()))
    (big_src / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    big = peak_rss(big_src, tmp_path / "big")
    assert big - small < 96 << 20, (small >> 20, big >> 20)
