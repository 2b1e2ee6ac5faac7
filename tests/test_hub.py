"""Converting straight from a Hub repository, against a local Hub served over HTTP (tests/fake_hub.py).

huggingface_hub's real client does every request; the server's log says what was fetched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from glm5conv.convert import convert
from glm5conv.errors import BadInputError, RemoteError, UsageError
from glm5conv.hub import HubRef, convert_from_hub, parse_hub_ref
from glm5conv.plan import ConvertOptions
from glm5conv.verify import verify_checkpoint
from tests.helpers import run_cli, run_cli_process

REPO = "amd/tiny-glm5-mxfp4"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def full_downloads(hub, name: str) -> list:
    """GETs of a whole file (not a ranged header read)."""
    return [r for r in hub.requests("GET", "/resolve/") if r.path.endswith("/" + name) and r.range is None]


@pytest.fixture
def reference(tmp_path: Path, bundled: Path) -> Path:
    """The same conversion made from the local folder."""
    out = tmp_path / "reference"
    convert(bundled, out, ConvertOptions())
    return out


@pytest.fixture
def published(hub, bundled: Path) -> str:
    return hub.add_repo(REPO, bundled)


def test_parse_hub_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hub_ref("hf://amd/GLM-5-MXFP4") == HubRef("amd/GLM-5-MXFP4")
    assert parse_hub_ref("hf://amd/GLM-5-MXFP4@refs%2Fpr%2F3") == HubRef("amd/GLM-5-MXFP4", "refs/pr/3")
    assert parse_hub_ref("amd/GLM-5-MXFP4@v1") == HubRef("amd/GLM-5-MXFP4", "v1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "glm").mkdir(parents=True)
    assert parse_hub_ref("models/glm") is None  # a local folder wins over a repo id
    assert parse_hub_ref("./glm") is None and parse_hub_ref("/abs/path") is None
    with pytest.raises(UsageError, match="not a Hub repository"):
        parse_hub_ref("hf://just-a-name")
    with pytest.raises(UsageError, match="model repository"):
        parse_hub_ref("hf://datasets/amd/x")


def test_dry_run_reads_only_config_index_and_mtp_headers(hub, published: str, tmp_path: Path) -> None:
    result = convert_from_hub(HubRef(REPO), tmp_path / "out", ConvertOptions(), overlay=True, dry_run=True)
    assert result.status == "dry-run" and not (tmp_path / "out").exists()
    rewritten = result.plan.rewritten_files
    sizes = {name: blob.size for name, blob in hub.tree(REPO).items()}
    assert result.hub["files_to_fetch"] == rewritten
    assert result.hub["bytes_to_fetch"] == sum(sizes[n] for n in rewritten)
    assert result.hub["commit"] == published
    for name in SHARDS:  # shards: never a whole-file GET, header reads only for the MTP shards
        assert full_downloads(hub, name) == []
    ranged = {r.path.rsplit("/", 1)[1] for r in hub.requests("GET", "/resolve/") if r.range}
    assert ranged == set(rewritten)


def test_overlay_fetches_only_the_rewritten_shards(hub, published: str, tmp_path: Path, reference: Path) -> None:
    dst = tmp_path / "overlay"
    result = convert_from_hub(HubRef(REPO), dst, ConvertOptions(), overlay=True)
    assert result.status == "converted"
    rewritten = result.plan.rewritten_files
    for name in SHARDS:
        assert len(full_downloads(hub, name)) == (1 if name in rewritten else 0), name
    untouched = sorted(set(SHARDS) - set(rewritten))
    assert sorted(os.listdir(dst)) == sorted(
        ["config.json", "glm5conv-manifest.json", "model.safetensors.index.json", *rewritten]
    )
    for name in os.listdir(dst):  # the same bytes as converting the local folder
        assert (dst / name).read_bytes() == (reference / name).read_bytes() or name == "glm5conv-manifest.json"
    manifest = json.loads((dst / "glm5conv-manifest.json").read_text())
    assert manifest["source"] == {"repo_id": REPO, "revision": "main", "commit": published}
    assert manifest["overlay"] is True
    for name in untouched:
        assert manifest["files"][name] == {
            "sha256": hub.tree(REPO)[name].sha256,
            "size": hub.tree(REPO)[name].size,
            "status": "in-source-repo",
        }
    report = verify_checkpoint(dst)  # reads the source's MTP headers from the Hub
    assert report.ok, report.checks
    assert "overlay" in report.checks[0].detail


def test_second_run_fetches_nothing(hub, published: str, tmp_path: Path) -> None:
    convert_from_hub(HubRef(REPO), tmp_path / "first", ConvertOptions(), overlay=True)
    hub.log.clear()
    second = convert_from_hub(HubRef(REPO), tmp_path / "second", ConvertOptions(), overlay=True)
    assert second.status == "converted" and second.hub["bytes_to_fetch"] == 0
    assert hub.bytes_served() == 0
    assert [r.path.split("?")[0] for r in hub.log if "agent-harnesses" not in r.path] == [f"/api/models/{REPO}"]


def test_complete_copy_links_from_the_cache(hub, published: str, tmp_path: Path, reference: Path) -> None:
    dst = tmp_path / "complete"
    result = convert_from_hub(HubRef(REPO), dst, ConvertOptions())
    assert result.hub["overlay"] is False and result.hub["bytes_left_on_hub"] == 0
    assert sorted(result.hub["files_to_fetch"] + result.hub["files_cached"]) == sorted(hub.tree(REPO))
    assert sorted(os.listdir(dst)) == sorted(os.listdir(reference))
    for name in os.listdir(dst):
        assert (dst / name).read_bytes() == (reference / name).read_bytes() or name == "glm5conv-manifest.json"
    (untouched,) = sorted(set(SHARDS) - set(result.plan.rewritten_files))
    blob = hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs" / hub.tree(REPO)[untouched].sha256
    assert os.path.samefile(dst / untouched, blob)
    assert verify_checkpoint(dst, against=reference).ok


def test_dropped_connection_resumes_with_a_range_request(hub, published: str, tmp_path: Path, monkeypatch) -> None:
    # huggingface_hub writes in DOWNLOAD_CHUNK_SIZE pieces (10 MB); scaled down to the tiny shard's size
    chunk = 16 << 10
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", chunk)
    shard = SHARDS[1]
    size = hub.tree(REPO)[shard].size
    hub.drop_after[shard] = [None, size // 2]  # the header read passes; the download drops halfway
    convert_from_hub(HubRef(REPO), tmp_path / "out", ConvertOptions(), overlay=True)
    downloads = [r for r in hub.requests("GET", shard) if r.range is None or not r.range.startswith("bytes=0-")]
    kept = size // 2 // chunk * chunk
    assert kept > 0
    assert [r.range for r in downloads] == [None, f"bytes={kept}-"]
    assert downloads[1].sent == size - kept  # the resumed request sends only the rest


def test_interrupted_run_keeps_finished_files_and_refetches_only_the_rest(hub, published: str, tmp_path: Path) -> None:
    dst = tmp_path / "complete"
    failing = SHARDS[0]
    hub.fail_gets[failing] = [403]
    with pytest.raises(RemoteError, match=failing):
        convert_from_hub(HubRef(REPO), dst, ConvertOptions())
    assert not dst.exists()  # nothing that looks like a checkpoint
    hub.log.clear()
    convert_from_hub(HubRef(REPO), dst, ConvertOptions())
    assert hub.bytes_served() == hub.tree(REPO)[failing].size
    assert verify_checkpoint(dst).ok


def test_missing_repo_revision_and_private_repo(
    hub, published: str, bundled: Path, tmp_path: Path, monkeypatch
) -> None:
    with pytest.raises(BadInputError, match="repository not found"):
        convert_from_hub(HubRef("amd/nothing"), tmp_path / "a", ConvertOptions(), dry_run=True)
    with pytest.raises(BadInputError, match="revision not found"):
        convert_from_hub(HubRef(REPO, "v9"), tmp_path / "a", ConvertOptions(), dry_run=True)
    hub.add_repo("amd/private", bundled, private=True)
    assert convert_from_hub(HubRef("amd/private"), tmp_path / "a", ConvertOptions(), dry_run=True).status == "dry-run"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(BadInputError, match="HF_TOKEN"):
        convert_from_hub(HubRef("amd/private"), tmp_path / "a", ConvertOptions(), dry_run=True)


def test_cli_convert_from_the_hub(hub, published: str, tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(["convert", f"hf://{REPO}", tmp_path / "out", "--overlay", "--dry-run", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["hub"]["commit"] == published and report["hub"]["bytes_to_fetch"] > 0
    code, _, err = run_cli(["convert", tmp_path / "local", tmp_path / "out2", "--overlay"], capsys)
    assert code == 2 and "--overlay needs a Hub source" in err
    proc = run_cli_process(["convert", f"hf://{REPO}@v9", tmp_path / "out3"], env=hub.env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "revision not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspect_from_the_hub_reads_no_shard_data(hub, published: str, bundled: Path, capsys) -> None:
    code, out, _ = run_cli(["inspect", f"hf://{REPO}", "--json"], capsys)
    assert code == 0
    remote = json.loads(out)
    code, out, _ = run_cli(["inspect", bundled, "--json"], capsys)
    local = json.loads(out)
    assert remote["mtp_tensors"] == local["mtp_tensors"] and remote["engines"] == local["engines"]
    for name in SHARDS:
        assert full_downloads(hub, name) == []
