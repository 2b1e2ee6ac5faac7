"""glm5conv verify CKPT"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.options import JsonOption, QuietOption
from glm5conv.cli.render import render_verify, stdout_console
from glm5conv.errors import EXIT_OK, EXIT_VERIFY_FAILED
from glm5conv.verify import verify_checkpoint

EXAMPLES = """Examples:

  glm5conv verify out/tiny-bf16 --against bundled:     # every converted tensor, bit for bit
  glm5conv verify /models/GLM-5-MXFP4 --engine sglang-0.5.16 --json

Exit status: 0 everything holds, 1 a check failed, 2 bad input or usage.
"""


@app.command("verify", epilog=EXAMPLES)
def verify_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder to verify, or bundled:NAME.")],
    against: Annotated[
        str | None, typer.Option("--against", help="Source checkpoint to compare every tensor with.")
    ] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option(
            "--engine", help="Engine that must load the MTP layer (repeatable; default: all the conversion targets)."
        ),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> int:
    """Check index, headers, total_size, MTP shapes per engine, manifest hashes, and (--against) values."""
    report = verify_checkpoint(
        resolve_source(checkpoint),
        against=resolve_source(against) if against else None,
        engines=tuple(engine) if engine else None,
    )
    if json_output:
        print(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        render_verify(report, stdout_console())
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED
