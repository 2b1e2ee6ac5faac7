"""The ``glm5conv`` command: thin Typer functions over library calls, one file per command.

Results go to stdout (one JSON document with ``--json``), chatter and errors to stderr.
Every glm5conv error becomes a one-line message and its exit code here, in ``main``;
tracebacks only with GLM5CONV_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys

import click
import typer

from glm5conv.errors import Glm5convError

app = typer.Typer(
    name="glm5conv",
    help="Make Quark-quantized GLM-5 checkpoints serve with MTP speculative decoding.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_INTERNAL = 4


def _register() -> None:
    from glm5conv.cli import (  # noqa: F401
        convert_command,
        generate_command,
        inspect_command,
        serve_command,
        sglang_patch_command,
        upload_command,
        verify_command,
    )


def _report_error(message: str, code: int, args: list[str]) -> int:
    print(f"glm5conv: error: {message}", file=sys.stderr)
    if "--json" in args:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}))
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    _register()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except Glm5convError as exc:
        if os.environ.get("GLM5CONV_DEBUG"):
            raise
        return _report_error(str(exc), exc.exit_code, args)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        return _report_error("interrupted", 130, args)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return _report_error("interrupted", 130, args)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for GLM5CONV_DEBUG
        if os.environ.get("GLM5CONV_DEBUG"):
            raise
        return _report_error(
            f"internal error: {exc.__class__.__name__}: {exc} (set GLM5CONV_DEBUG=1 for a traceback)",
            EXIT_INTERNAL,
            args,
        )


def run() -> None:
    sys.exit(main())
