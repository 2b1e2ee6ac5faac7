"""Checkpoints shipped inside the package, addressed as ``bundled:NAME``."""

from __future__ import annotations

from pathlib import Path

from glm5conv.errors import UsageError

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_PREFIX = "bundled:"
DEFAULT_BUNDLED = "tiny-glm5-mxfp4"


def bundled_names() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def bundled_path(name: str = DEFAULT_BUNDLED) -> Path:
    path = BUNDLED_DIR / name
    if not (path / "config.json").is_file():
        known = ", ".join(bundled_names()) or "none"
        raise UsageError(f"{BUNDLED_PREFIX}{name}: no such bundled checkpoint (bundled: {known})")
    return path


def resolve_source(source: str) -> Path:
    """A path, or ``bundled:NAME`` (``bundled:`` alone is the default tiny checkpoint)."""
    if source.startswith(BUNDLED_PREFIX):
        return bundled_path(source[len(BUNDLED_PREFIX) :] or DEFAULT_BUNDLED)
    return Path(source)
