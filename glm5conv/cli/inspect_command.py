"""glm5conv inspect CKPT"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.options import JsonOption
from glm5conv.cli.render import render_inspect, stdout_console
from glm5conv.hub import list_repo, parse_hub_ref, remote_checkpoint_files
from glm5conv.inspection import inspect_checkpoint

EXAMPLES = """Examples:

  glm5conv inspect bundled:                     # the bundled tiny GLM-5-MXFP4
  glm5conv inspect /models/GLM-5-MXFP4 --json   # one JSON document for CI
  glm5conv inspect hf://amd/GLM-5-MXFP4         # from the Hub: reads config, index and MTP headers only
"""


@app.command("inspect", epilog=EXAMPLES)
def inspect_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, bundled:NAME, or hf://OWNER/NAME[@REVISION].")],
    json_output: JsonOption = False,
) -> int:
    """Show the MTP layer, its quantization and exclude entries, and whether each engine loads it."""
    ref = parse_hub_ref(checkpoint)
    if ref is not None:
        root, remote = remote_checkpoint_files(list_repo(ref))
        report = inspect_checkpoint(root, remote)
    else:
        report = inspect_checkpoint(resolve_source(checkpoint))
    if json_output:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render_inspect(report, stdout_console())
    return 0
