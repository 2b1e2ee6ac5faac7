"""The one exception family of glm5conv.

Every error a user can cause or meet carries an exit code and a one-line message that names
the file and the problem. The CLI maps them to exit codes in one place; library callers catch
``Glm5convError``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_OUTPUT_FAILED = 3
EXIT_REMOTE_FAILED = 6


class Glm5convError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code: int = EXIT_BAD_INPUT


class BadInputError(Glm5convError):
    """The source checkpoint (or a file in it) is missing, malformed or unsupported."""


class UsageError(Glm5convError):
    """The command's arguments do not fit together (DST inside SRC, DST not empty, ...)."""


class VerificationError(Glm5convError):
    """A checkpoint was read fine but does not hold what it must."""

    exit_code = EXIT_VERIFY_FAILED


class OutputError(Glm5convError):
    """Writing the output failed (disk full, permissions); nothing valid-looking was left."""

    exit_code = EXIT_OUTPUT_FAILED


class RemoteError(Glm5convError):
    """The Hugging Face Hub (or the network to it) refused or failed a request."""

    exit_code = EXIT_REMOTE_FAILED
