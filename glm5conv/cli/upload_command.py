"""glm5conv upload DST REPO_ID"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from huggingface_hub.utils import disable_progress_bars

from glm5conv.cli import app
from glm5conv.cli.options import JsonOption, QuietOption
from glm5conv.cli.render import render_upload, stdout_console
from glm5conv.upload import plan_upload, push, read_output, source_card

EXAMPLES = """Examples:

  glm5conv upload out/glm5 me/GLM-5-MXFP4-mtp --dry-run        # the commit's operations and bytes
  glm5conv upload out/glm5 me/GLM-5-MXFP4-mtp --private
  glm5conv upload out/glm5 amd/GLM-5-MXFP4 --create-pr         # propose the fix to the source repo

The token comes from HF_TOKEN or `hf auth login`; it is never printed.
"""


@app.command("upload", epilog=EXAMPLES)
def upload_cmd(
    dst: Annotated[Path, typer.Argument(help="Output folder of glm5conv convert (complete or --overlay).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository to commit to (created if missing).")],
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (default main).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the commit's operations and bytes; send nothing.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> int:
    """Publish a conversion in one commit: changed files uploaded, the rest copied from the source repo on the Hub."""
    manifest = read_output(dst)
    plan = plan_upload(
        dst,
        manifest,
        repo_id,
        base_card=source_card(dst, manifest),
        revision=revision,
        create_pr=create_pr,
        private=private,
    )
    result = None
    if not dry_run:
        if json_output or quiet or not sys.stderr.isatty():
            disable_progress_bars()
        result = push(plan, say=None if quiet or json_output else lambda m: print(f"glm5conv: {m}", file=sys.stderr))
    if json_output:
        print(json.dumps({**plan.to_json(), "dry_run": dry_run, "result": result}, indent=2))
    elif not quiet:
        render_upload(plan, result, stdout_console())
    return 0
