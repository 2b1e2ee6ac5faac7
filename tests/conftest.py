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


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A local Hub (tests/fake_hub.py) that huggingface_hub talks to, in this process and in child processes.

    huggingface_hub reads HF_ENDPOINT and friends once, at import: the in-process client is pointed
    at the server through its constants; children get the environment variables.
    """
    import secrets

    from huggingface_hub import constants

    from tests.fake_hub import FakeHub

    token = "hf_" + secrets.token_hex(16)
    with FakeHub(tmp_path / "fake-hub", token) as server:
        cache = tmp_path / "hf-cache"
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", token)
        server.cache = cache
        server.env = {
            "HF_ENDPOINT": server.endpoint,
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": token,
        }
        yield server
