"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (no progress, no colour).")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only errors (and the JSON document with --json).")
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Say what is being done, step by step, on stderr.")
]
