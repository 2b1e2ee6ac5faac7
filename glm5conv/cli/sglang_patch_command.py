"""glm5conv sglang-patch [--check | --apply | --revert]"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from glm5conv import sglang_patch
from glm5conv.cli import app
from glm5conv.cli.options import JsonOption
from glm5conv.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_FAILED, UsageError

EXAMPLES = """Examples:

  glm5conv sglang-patch --check      # exit 1 if the installed SGLang needs the patch
  glm5conv sglang-patch --apply      # then: glm5conv serve CKPT --engine sglang
  glm5conv sglang-patch --revert     # the original file, byte for byte
"""


@app.command("sglang-patch", epilog=EXAMPLES)
def sglang_patch_cmd(
    check: Annotated[bool, typer.Option("--check", help="Report only (the default).")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Patch the installed SGLang (keeps a backup).")] = False,
    revert: Annotated[bool, typer.Option("--revert", help="Restore the original file.")] = False,
    sglang_dir: Annotated[
        Path | None,
        typer.Option("--sglang-dir", help="The site-packages (or sglang package) folder, if not this Python's."),
    ] = None,
    json_output: JsonOption = False,
) -> int:
    """Give SGLang releases without the MTP fixes (<= 0.5.15) a Quark-aware eh_proj and MTP exclude mapping."""
    if sum((check, apply, revert)) > 1:
        raise UsageError("give one of --check, --apply, --revert")
    if apply:
        state = sglang_patch.apply(sglang_dir)
    elif revert:
        state = sglang_patch.revert(sglang_dir)
    else:
        state = sglang_patch.status(sglang_dir)
    if json_output:
        print(json.dumps(state.to_json()))
    else:
        print(f"{state.package} (SGLang {state.version or 'unknown version'}): {state.state} - {state.detail}")
    if state.state == "unrecognised":
        return EXIT_BAD_INPUT
    return EXIT_VERIFY_FAILED if state.needs_patch and not (apply or revert) else EXIT_OK
