"""glm5conv convert SRC DST"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.options import JsonOption, QuietOption, VerboseOption
from glm5conv.cli.progress import ConvertProgress
from glm5conv.cli.render import render_convert, stdout_console
from glm5conv.convert import convert, result_json
from glm5conv.errors import UsageError
from glm5conv.hub import convert_from_hub, parse_hub_ref
from glm5conv.plan import ConvertOptions
from glm5conv.writer import WriteOptions

EXAMPLES = """Examples:

  glm5conv convert bundled: out/tiny-bf16                          # eh_proj -> bf16 [H, 2H]
  glm5conv convert /models/GLM-5-MXFP4 /models/GLM-5-MXFP4-mtp --dry-run
  glm5conv convert SRC DST --to bf16 --scope mtp                   # the whole MTP layer in bf16
  glm5conv convert SRC DST --to mxfp4 --scope mtp --json           # 4-bit, Quark's layout
  glm5conv convert SRC DST --resume                                # finish a run that was killed
  glm5conv convert /models/GLM-5-MXFP4 --in-place                  # no room for a second copy
  glm5conv convert hf://amd/GLM-5-MXFP4 out/glm5 --overlay --dry-run  # bytes to fetch from the Hub
  glm5conv convert hf://amd/GLM-5-MXFP4@main out/glm5 --overlay      # fetch only the shard(s) it rewrites
"""


@app.command("convert", epilog=EXAMPLES)
def convert_cmd(
    src: Annotated[
        str,
        typer.Argument(help="Source checkpoint folder (only read), bundled:NAME, or hf://OWNER/NAME[@REVISION]."),
    ],
    dst: Annotated[
        Path | None, typer.Argument(help="Output folder (must not exist or be empty; see --force, --in-place).")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="bf16: dequantize exactly; mxfp4: keep/repack 4-bit as Quark does.")
    ] = "bf16",
    scope: Annotated[
        str, typer.Option("--scope", help="eh-proj: only eh_proj; mtp: every Linear of the MTP layer.")
    ] = "eh-proj",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty DST (or discard an interrupted run).")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Complete an interrupted run, reusing what it wrote.")
    ] = False,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Rewrite SRC itself (needs room only for the rewritten shards).")
    ] = False,
    copy: Annotated[bool, typer.Option("--copy", help="Copy unchanged files instead of hard-linking them.")] = False,
    hash_unchanged: Annotated[
        bool,
        typer.Option(
            "--hash-unchanged",
            help="Also record the sha256 of unchanged shards in the manifest (reads them all; free for HF cache snapshots).",
        ),
    ] = False,
    overlay: Annotated[
        bool,
        typer.Option(
            "--overlay",
            help="Hub source: DST holds only the files that differ (upload puts them on top of the source repo).",
        ),
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> int:
    """Rewrite the MTP weights into the form the engines' loaders expect; the source is never modified."""
    write = WriteOptions(force=force, copy=copy, resume=resume, in_place=in_place, hash_unchanged=hash_unchanged)
    options = ConvertOptions(to=to, scope=scope)
    ref = parse_hub_ref(src)
    if overlay and ref is None:
        raise UsageError("--overlay needs a Hub source (hf://OWNER/NAME); a local DST is always complete")
    with ConvertProgress(bars=not (json_output or quiet), verbose=verbose and not json_output) as progress:
        if ref is not None:
            result = convert_from_hub(
                ref, dst, options, overlay=overlay, write=write, dry_run=dry_run, progress=progress
            )
        else:
            result = convert(resolve_source(src), dst, options, write=write, dry_run=dry_run, progress=progress)
    if json_output:
        print(json.dumps(result_json(result), indent=2))
    elif not quiet:
        render_convert(result, stdout_console())
    return 0
