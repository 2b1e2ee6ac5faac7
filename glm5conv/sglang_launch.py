"""``glm5conv serve --engine sglang``: pre-flight, the launch line, and running SGLang safely.

Pre-flight runs glm5conv's engine rules for the installed SGLang release (patched or not) on the
checkpoint and refuses, with the fix, when the MTP layer would not load - before a 20-minute load
finds out. The launch is SGLang's documented EAGLE/NEXTN setup with topk 1; the platform adds
what it needs (ROCm: AITER), flags that avoid known load failures are added where the rules say
so, and the user's own arguments go last. The server runs in its own process group, so Ctrl-C or
an error stops every TP worker with it.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glm5conv.checkpoint import open_checkpoint
from glm5conv.engines import DISABLE_FUSION_FLAG, evaluate, sglang_profile
from glm5conv.errors import Glm5convError, UsageError
from glm5conv.mtp import layer_storage
from glm5conv.quark_config import parse_quark_config, quantization_method
from glm5conv.sglang_patch import find_sglang, status

WEIGHT_FRACTION = 0.5  # weights may use at most half of each GPU's memory (KV cache, graphs, draft)


class EngineError(Glm5convError):
    """SGLang could not be started, or stopped before it served."""

    exit_code = 5


@dataclass(frozen=True)
class Platform:
    kind: str  # "rocm" or "cuda"
    gpus: int
    gpu_memory_gb: float
    name: str = ""


def detect_platform() -> Platform:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise EngineError("no GPU visible to PyTorch: SGLang needs ROCm (MI300X/MI355X) or CUDA GPUs")
    props = torch.cuda.get_device_properties(0)
    kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return Platform(kind, torch.cuda.device_count(), props.total_memory / 1e9, props.name)


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    tp: int
    sglang_version: str
    patched: bool
    platform: Platform
    checkpoint_gb: float
    notes: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + " ".join(shlex.quote(a) for a in self.argv)


def _checkpoint_bytes(path: Path) -> int:
    with open_checkpoint(path) as checkpoint:
        return checkpoint.file_bytes_total()


def choose_tp(checkpoint_bytes: int, platform: Platform, heads: int) -> int:
    """The smallest power-of-two TP whose share of the weights fits half a GPU (and divides the heads)."""
    tp = 1
    while tp < platform.gpus and (checkpoint_bytes / tp > WEIGHT_FRACTION * platform.gpu_memory_gb * 1e9 or heads % tp):
        tp *= 2
    if tp > platform.gpus or checkpoint_bytes / tp > WEIGHT_FRACTION * platform.gpu_memory_gb * 1e9:
        need = math.ceil(checkpoint_bytes / (WEIGHT_FRACTION * platform.gpu_memory_gb * 1e9))
        raise EngineError(
            f"the checkpoint ({checkpoint_bytes / 1e9:.0f} GB) needs at least {need} GPUs of {platform.gpu_memory_gb:.0f} GB; "
            f"{platform.gpus} visible"
        )
    return tp


def plan_launch(
    checkpoint: Path,
    *,
    sglang_version: str,
    patched: bool,
    platform: Platform,
    tp: int | None = None,
    speculative_num_steps: int = 3,
    host: str = "127.0.0.1",
    port: int = 30000,
    extra_args: list[str] | None = None,
    python: str = sys.executable,
) -> LaunchPlan:
    """Check the checkpoint against the installed SGLang's rules and compose the launch."""
    extra = list(extra_args or [])
    notes: list[str] = []
    with open_checkpoint(checkpoint) as ckpt:
        layout = ckpt.layout
        method = quantization_method(ckpt.config)
        heads = ckpt.config.get("num_attention_heads", 1)
        size = ckpt.file_bytes_total()
        storage = layer_storage(ckpt)
        if method == "quark":
            quark = parse_quark_config(ckpt.config, ckpt.config_path)
            exclude = quark.exclude
            if platform.kind != "rocm" and quark.is_mxfp4:
                raise EngineError(
                    "SGLang runs Quark MXFP4 weights with AITER kernels on ROCm only; this platform is CUDA"
                )
        elif method is None:
            exclude = ()
        else:
            raise EngineError(
                f"{checkpoint}: quantization '{method}': glm5conv's pre-flight covers Quark and unquantized checkpoints"
            )
    profile, note = sglang_profile(sglang_version, patched)
    if note:
        notes.append(note)
    if speculative_num_steps:
        disabled = DISABLE_FUSION_FLAG in extra
        verdict = evaluate(
            profile,
            layout,
            exclude,
            storage,
            quantized_checkpoint=method == "quark",
            disable_shared_experts_fusion=disabled,
        )
        if verdict.status == "fails":
            problem = next(p for p in verdict.problems if not p.needs_flag)
            fix = f"glm5conv convert {checkpoint} DST" + (" --to bf16" if "--to bf16" in problem.fix else "")
            if profile.key.split("-patched")[0] in ("sglang-0.5.10", "sglang-0.5.11") and not patched:
                fix += ", or glm5conv sglang-patch --apply"
            raise EngineError(f"the MTP layer would not load: {problem.message}; fix: {fix}")
        for flag in verdict.flags:
            if flag not in extra:
                extra.append(flag)
                notes.append(f"added {flag}: {verdict.problems[0].message}")
    tp = tp or choose_tp(size, platform, heads)
    if tp > platform.gpus:
        raise EngineError(f"--tp {tp} but only {platform.gpus} GPU(s) visible")
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(checkpoint), "--tp", str(tp)]
    argv += ["--host", host, "--port", str(port)]
    if speculative_num_steps:
        argv += [
            "--speculative-algorithm", "EAGLE",
            "--speculative-num-steps", str(speculative_num_steps),
            "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", str(speculative_num_steps + 1),
        ]  # fmt: skip
    env = {"SGLANG_USE_AITER": "1"} if platform.kind == "rocm" else {}
    return LaunchPlan(argv + extra, env, tp, sglang_version, patched, platform, size / 1e9, notes)


def installed_sglang(package: Path | None = None) -> tuple[str, bool]:
    """(version, patched by glm5conv) of the SGLang this Python would run."""
    pkg, version = find_sglang(package)
    if version is None:
        raise UsageError(f"{pkg}: cannot tell the SGLang version (no dist-info)")
    return version, status(pkg).state == "patched"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, poll: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"SGLang exited with code {proc.returncode} before it was ready (see its log above)")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll)
    raise EngineError(f"SGLang did not answer {url} within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's whole process group (TP workers included), SIGKILL what remains.

    The group's id is the leader's pid (it was started in a new session), still valid after the
    leader itself has died and left its workers behind.
    """
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)  # anyone left in the group?
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.1)


def run_server(
    argv: list[str],
    env: dict[str, str],
    health_url: str,
    *,
    on_ready: Callable[[], None],
    timeout: float = 3600.0,
    log_prefix: str = "[sglang] ",
    stop: threading.Event | None = None,
    poll: float = 2.0,
) -> int:
    """Start the server in its own process group, stream its log, wait for health, serve until it exits,
    ``stop`` is set, or Ctrl-C; the whole group is stopped on the way out."""
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )

    def pump() -> None:
        for line in proc.stdout:
            sys.stderr.write(log_prefix + line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        wait_healthy(health_url, proc, timeout, poll)
        on_ready()
        while proc.poll() is None:
            if stop is not None and stop.wait(0.5):
                return 0
            if stop is None:
                time.sleep(0.5)
        raise EngineError(f"SGLang exited with code {proc.returncode}")
    finally:
        stop_group(proc)
