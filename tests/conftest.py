"""Shared fixtures; slow and GPU tests are skipped visibly (with a reason) unless enabled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from glm5conv.bundled import bundled_path

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA/ROCm device here"))


@pytest.fixture(scope="session")
def bundled() -> Path:
    """The bundled Quark-made tiny checkpoint (read-only: tests must copy before changing it)."""
    return bundled_path()


@pytest.fixture
def src(tmp_path: Path, bundled: Path) -> Path:
    """A private copy of the bundled checkpoint that a test may corrupt."""
    path = tmp_path / "src"
    shutil.copytree(bundled, path)
    return path
