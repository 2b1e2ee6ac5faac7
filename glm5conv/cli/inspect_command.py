"""glm5conv inspect CKPT"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.options import JsonOption
from glm5conv.cli.render import render_inspect, stdout_console
from glm5conv.inspection import inspect_checkpoint

EXAMPLES = """Examples:

  glm5conv inspect bundled:                     # the bundled tiny GLM-5-MXFP4
  glm5conv inspect /models/GLM-5-MXFP4 --json   # one JSON document for CI
"""


@app.command("inspect", epilog=EXAMPLES)
def inspect_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, or bundled:NAME.")],
    json_output: JsonOption = False,
) -> int:
    """Show the MTP layer, its quantization and exclude entries, and whether each engine loads it."""
    report = inspect_checkpoint(resolve_source(checkpoint))
    if json_output:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render_inspect(report, stdout_console())
    return 0
