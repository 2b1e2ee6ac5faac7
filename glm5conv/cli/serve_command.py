"""glm5conv serve CKPT [--engine runtime|sglang]"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.generate_command import DeviceOption, DtypeOption
from glm5conv.errors import UsageError

EXAMPLES = """Examples:

  glm5conv serve bundled:tiny-glm5-trained --port 8000                 # the bundled runtime
  glm5conv serve /models/GLM-5-MXFP4-mtp --engine sglang --dry-run     # pre-flight + the launch line
  glm5conv serve /models/GLM-5-MXFP4-mtp --engine sglang --tp 8 -- --mem-fraction-static 0.85
"""


@app.command("serve", epilog=EXAMPLES, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, or bundled:NAME.")],
    engine: Annotated[
        str, typer.Option("--engine", help="runtime (bundled, small models) or sglang (full size).")
    ] = "runtime",
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (loopback unless told otherwise).")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="Default 8000 (runtime), 30000 (sglang).")
    ] = None,
    speculative_num_steps: Annotated[int, typer.Option("--speculative-num-steps", min=0, help="0 = no MTP.")] = 3,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    tp: Annotated[
        int | None,
        typer.Option("--tp", min=1, help="sglang: tensor parallel size (default: what the GPUs' memory needs)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="sglang: print the pre-flight result, command and environment; start nothing."),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="sglang --dry-run: one JSON document.")] = False,
    sglang_version: Annotated[
        str | None, typer.Option("--sglang-version", help="Plan for this SGLang release instead of the installed one.")
    ] = None,
    sglang_patched: Annotated[
        bool, typer.Option("--sglang-patched", help="With --sglang-version: as patched by glm5conv sglang-patch.")
    ] = False,
    platform: Annotated[
        str | None, typer.Option("--platform", help="Plan for rocm or cuda instead of this machine's.")
    ] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, help="With --platform: number of GPUs.")] = None,
    gpu_memory_gb: Annotated[
        float | None, typer.Option("--gpu-memory-gb", help="With --platform: memory per GPU.")
    ] = None,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="sglang: seconds to wait for /health.")
    ] = 3600.0,
) -> int:
    """Serve an OpenAI-compatible API with MTP speculative decoding: the bundled runtime, or SGLang for full-size GLM-5."""
    path = resolve_source(checkpoint)
    if engine == "runtime":
        if ctx.args:
            raise UsageError(f"unexpected arguments {ctx.args} (extra arguments go to --engine sglang)")
        from glm5conv.runtime import load_model
        from glm5conv.server import serve

        loaded = load_model(path, device=device, dtype=dtype)
        typer.echo(f"glm5conv: serving {loaded.path.name} on http://{host}:{port or 8000}/v1", err=True)
        serve(loaded, host, port or 8000, speculative_num_steps)
        return 0
    if engine != "sglang":
        raise UsageError(f"--engine must be runtime or sglang, not '{engine}'")
    return _serve_sglang(
        path, ctx.args, host=host, port=port or 30000, steps=speculative_num_steps, tp=tp, dry_run=dry_run,
        json_output=json_output, version=sglang_version, patched=sglang_patched, platform=platform, gpus=gpus,
        gpu_memory_gb=gpu_memory_gb, ready_timeout=ready_timeout,
    )  # fmt: skip


def _serve_sglang(path: Path, extra: list[str], *, host, port, steps, tp, dry_run, json_output, version, patched,
                  platform, gpus, gpu_memory_gb, ready_timeout) -> int:  # fmt: skip
    from glm5conv import sglang_launch as sl

    if version is None:
        version, patched = sl.installed_sglang()
    if platform is None:
        target = sl.detect_platform()
    else:
        if platform not in ("rocm", "cuda") or gpus is None or gpu_memory_gb is None:
            raise UsageError("--platform rocm|cuda needs --gpus and --gpu-memory-gb")
        target = sl.Platform(platform, gpus, gpu_memory_gb)
    plan = sl.plan_launch(
        path, sglang_version=version, patched=patched, platform=target, tp=tp, speculative_num_steps=steps,
        host=host, port=port, extra_args=extra,
    )  # fmt: skip
    if dry_run:
        if json_output:
            print(json.dumps({"argv": plan.argv, "env": plan.env, "tp": plan.tp, "sglang_version": plan.sglang_version,
                              "patched": plan.patched, "platform": plan.platform.kind, "checkpoint_gb": round(plan.checkpoint_gb, 1),
                              "notes": plan.notes}))  # fmt: skip
        else:
            for note in plan.notes:
                typer.echo(f"glm5conv: {note}", err=True)
            print(plan.command)
        return 0
    for note in plan.notes:
        typer.echo(f"glm5conv: {note}", err=True)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    sl.run_server(
        plan.argv,
        plan.env,
        base + "/health",
        on_ready=lambda: print(f"OpenAI base URL: {base}/v1", flush=True),
        timeout=ready_timeout,
    )
    return 0
