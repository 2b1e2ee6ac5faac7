"""serve --engine sglang: pre-flight and launch composition (dry runs), and the process-group lifecycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from glm5conv import sglang_launch as sl
from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from tests.conftest import REPO
from tests.helpers import run_cli

MI300X = ["--platform", "rocm", "--gpus", "8", "--gpu-memory-gb", "192"]
MI355X = ["--platform", "rocm", "--gpus", "4", "--gpu-memory-gb", "288"]
H100X8 = ["--platform", "cuda", "--gpus", "8", "--gpu-memory-gb", "80"]


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Path:
    """GLM-5-MXFP4's real layout, 282 sparse shards (429 GB apparent, a few MB on disk)."""
    path = tmp_path_factory.mktemp("synthetic") / "GLM-5-MXFP4"
    subprocess.run(
        [sys.executable, "scripts/make_synthetic_glm5.py", str(path), "--sparse"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return path


def dry_run(capsys, checkpoint, *args: str) -> tuple[int, dict | str]:
    code, out, err = run_cli(["serve", checkpoint, "--engine", "sglang", "--dry-run", "--json", *args], capsys)
    return code, (json.loads(out) if code == 0 else err)


def test_full_size_on_mi300x_and_mi355x(capsys, full_size: Path) -> None:
    code, plan = dry_run(capsys, full_size, "--sglang-version", "0.5.23", *MI300X)
    assert code == 0 and plan["tp"] == 8 and plan["env"] == {"SGLANG_USE_AITER": "1"} and plan["checkpoint_gb"] > 400
    argv = plan["argv"]
    assert argv[1:3] == ["-m", "sglang.launch_server"] and argv[argv.index("--model-path") + 1] == str(full_size)
    i = argv.index("--speculative-algorithm")
    assert argv[i : i + 8] == ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                               "--speculative-num-draft-tokens", "4"]  # fmt: skip
    assert "--disable-shared-experts-fusion" in argv  # bf16 shared expert beside MXFP4 experts, 256 of them
    code, plan = dry_run(capsys, full_size, "--sglang-version", "0.5.23", *MI355X, "--speculative-num-steps", "2")
    assert code == 0 and plan["tp"] == 4 and "--speculative-num-draft-tokens" in plan["argv"]
    assert plan["argv"][plan["argv"].index("--speculative-num-draft-tokens") + 1] == "3"


def test_too_few_gpus(capsys, full_size: Path) -> None:
    code, err = dry_run(
        capsys, full_size, "--sglang-version", "0.5.23", "--platform", "rocm", "--gpus", "2", "--gpu-memory-gb", "192"
    )
    assert code == 5 and "needs at least 5 GPUs of 192 GB; 2 visible" in err


def test_cuda_refuses_quark_mxfp4_but_launches_unquantized(
    capsys, tmp_path: Path, bundled: Path, full_size: Path
) -> None:
    code, err = dry_run(capsys, full_size, "--sglang-version", "0.5.23", *H100X8)
    assert code == 5 and "AITER kernels on ROCm only" in err
    pytest.importorskip("quark")
    from tests.test_runtime import quark_dequantized_copy

    plain = quark_dequantized_copy(bundled, tmp_path / "bf16")
    code, plan = dry_run(capsys, plain, "--sglang-version", "0.5.23", *H100X8)
    assert code == 0 and plan["env"] == {} and plan["tp"] == 1


def test_preflight_per_version_and_fix(capsys, tmp_path: Path, full_size: Path) -> None:
    code, err = dry_run(capsys, full_size, "--sglang-version", "0.5.10.post1", *MI300X)
    assert (
        code == 5
        and "Attempted to load weight (torch.Size([6144, 6144])) into parameter (torch.Size([6144, 12288]))" in err
    )
    assert f"glm5conv convert {full_size} DST --to bf16, or glm5conv sglang-patch --apply" in err
    code, plan = dry_run(capsys, full_size, "--sglang-version", "0.5.10.post1", "--sglang-patched", *MI300X)
    assert code == 0, plan  # the patch makes eh_proj Quark-aware
    # GLM-5's main layer 61 excludes its attention and shared expert: SGLang <= 0.5.15 maps them onto the draft
    code, plan = dry_run(capsys, full_size, "--sglang-version", "0.5.13", *MI300X)
    assert code == 0 and any("0.5.13 was not read" in n for n in plan["notes"]) is False
    converted = tmp_path / "converted"
    convert(full_size, converted, ConvertOptions())
    for version in ("0.5.10.post1", "0.5.11", "0.5.16", "0.5.23"):
        code, plan = dry_run(capsys, converted, "--sglang-version", version, *MI300X)
        assert code == 0, (version, plan)


def test_user_arguments_go_last(capsys, bundled: Path) -> None:
    code, out, _ = run_cli(
        ["serve", bundled, "--engine", "sglang", "--dry-run", "--sglang-version", "0.5.16", *MI300X, "--port", "31000",
         "--", "--mem-fraction-static", "0.8"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert out.startswith("SGLANG_USE_AITER=1 ") and out.strip().endswith("--mem-fraction-static 0.8")
    assert "--port 31000" in out and "--tp 1" in out


def test_no_mtp(capsys, bundled: Path) -> None:
    code, plan = dry_run(capsys, bundled, "--sglang-version", "0.5.10", *MI300X, "--speculative-num-steps", "0")
    assert code == 0 and "--speculative-algorithm" not in plan["argv"]


def test_missing_sglang_and_missing_gpu(capsys, bundled: Path) -> None:
    code, _, err = run_cli(["serve", bundled, "--engine", "sglang", "--dry-run"], capsys)
    assert code == 2 and "SGLang is not installed" in err
    code, _, err = run_cli(["serve", bundled, "--engine", "sglang", "--dry-run", "--sglang-version", "0.5.23"], capsys)
    import torch

    if not torch.cuda.is_available():
        assert code == 5 and "no GPU visible" in err


STAND_IN = textwrap.dedent(
    """
    import http.server, os, subprocess, sys, threading, time
    port, pids, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    open(pids, "w").write(" ".join(str(p) for p in [os.getpid()] + [w.pid for w in workers]))
    print("loading weights", flush=True)
    if mode == "die":
        time.sleep(0.5)
        sys.exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            "silent"
    time.sleep(0.5)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_stop_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    from tests.test_server import free_port

    port = free_port()
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    pids_file = tmp_path / "pids"
    ready, stop = threading.Event(), threading.Event()
    result: dict = {}

    def serve() -> None:
        result["code"] = sl.run_server(
            [sys.executable, str(script), str(port), str(pids_file), "serve"], {}, f"http://127.0.0.1:{port}/health",
            on_ready=ready.set, timeout=60, stop=stop, poll=0.1,
        )  # fmt: skip

    thread = threading.Thread(target=serve)
    thread.start()
    assert ready.wait(60)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(alive(p) for p in pids)
    stop.set()  # as Ctrl-C does
    thread.join(30)
    assert result["code"] == 0
    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "orphaned TP workers"


def test_a_server_that_dies_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    from tests.test_server import free_port

    port = free_port()
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    pids_file = tmp_path / "pids"
    with pytest.raises(sl.EngineError, match="SGLang exited with code 3 before it was ready"):
        sl.run_server([sys.executable, str(script), str(port), str(pids_file), "die"], {}, f"http://127.0.0.1:{port}/health",
                      on_ready=lambda: None, timeout=60, poll=0.1)  # fmt: skip
    pids = [int(p) for p in pids_file.read_text().split()]
    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
