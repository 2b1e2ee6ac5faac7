"""Publishing conversions with ``glm5conv upload`` against a local Hub (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from glm5conv.errors import BadInputError, RemoteError, UsageError, VerificationError
from glm5conv.hub import HubRef, convert_from_hub
from glm5conv.plan import ConvertOptions
from glm5conv.upload import CARD_BEGIN, model_card, plan_upload, push, read_output, source_card
from tests.helpers import run_cli_process

REPO = "amd/tiny-glm5-mxfp4"
TARGET = "me/tiny-glm5-mtp"


@pytest.fixture
def source(hub, bundled: Path, tmp_path: Path) -> str:
    folder = tmp_path / "source-repo"
    folder.mkdir()
    for item in bundled.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# Tiny GLM-5\n\nA test model.\n")
    return hub.add_repo(REPO, folder)


@pytest.fixture
def overlay(hub, source: str, tmp_path: Path) -> Path:
    dst = tmp_path / "overlay"
    convert_from_hub(HubRef(REPO), dst, ConvertOptions(), overlay=True)
    return dst


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(dst: Path, repo_id: str, **options) -> tuple:
    manifest = read_output(dst)
    plan = plan_upload(dst, manifest, repo_id, base_card=source_card(dst, manifest), **options)
    return plan, push(plan)


def test_model_card_keeps_the_source_card_and_replaces_its_own_section(overlay: Path) -> None:
    manifest = read_output(overlay)
    base = "---\nlicense: mit\n---\n\n# Model\n"
    card = model_card(base, manifest, TARGET)
    assert card.startswith(base) and card.count(CARD_BEGIN) == 1
    assert manifest["source"]["commit"] in card
    for name, record in manifest["files"].items():
        listed = record["sha256"] is not None and record["sha256"] in card
        assert listed == (record["status"] != "in-source-repo"), name
    assert model_card(card, manifest, TARGET) == card  # converting and uploading again: one section
    assert model_card(None, manifest, TARGET).startswith(f"---\nbase_model: {REPO}\n")


def test_overlay_upload_sends_only_the_changed_files(hub, source: str, overlay: Path) -> None:
    manifest = read_output(overlay)
    plan, result = upload(overlay, TARGET)
    written = {n for n, r in manifest["files"].items() if r["status"] != "in-source-repo"}
    carried = {n for n, r in manifest["files"].items() if r["status"] == "in-source-repo"} - {"README.md"}
    uploaded_oids = {r.path.rsplit("/", 1)[1] for r in hub.requests("PUT", "/lfs-upload/")}
    assert uploaded_oids == {manifest["files"][n]["sha256"] for n in written if n.endswith(".safetensors")}
    (commit,) = hub.commits
    assert commit["repo"] == TARGET and commit["commit"] == result["commit"]
    ops = dict((path, key) for key, path in commit["ops"])
    assert set(ops) == written | carried | {"glm5conv-manifest.json", "README.md"}
    assert sum(r.received for r in hub.requests("PUT")) == plan.bytes_to_upload - sum(
        op.size for op in plan.ops if not op.path.endswith(".safetensors")
    )
    published = hub.tree(TARGET)
    original = hub.tree(REPO)
    for name in carried:  # carried over by a server-side copy: same content, no bytes sent
        assert published[name].sha256 == original[name].sha256 or published[name].read() == original[name].read()
    for name in written:
        assert sha256(published[name].read()) == manifest["files"][name]["sha256"]
    card = published["README.md"].read().decode()
    assert card.startswith("---\nlicense: mit\n---\n\n# Tiny GLM-5") and CARD_BEGIN in card
    # the published repository converts as "already done" and serves every engine
    again = convert_from_hub(HubRef(TARGET), overlay.parent / "again", ConvertOptions(), dry_run=True)
    assert again.status == "noop"


def test_pull_request_to_the_source_repo_holds_exactly_the_changed_files(hub, source: str, overlay: Path) -> None:
    manifest = read_output(overlay)
    plan, result = upload(overlay, REPO, create_pr=True)
    assert plan.ops and all(op.action == "upload" for op in plan.ops)
    (commit,) = hub.commits
    written = {n for n, r in manifest["files"].items() if r["status"] != "in-source-repo"}
    assert {path for _, path in commit["ops"]} == written | {"glm5conv-manifest.json", "README.md"}
    assert result["pr_url"].endswith("/discussions/1")
    assert hub.repos[REPO].branches["main"] == source  # main untouched
    assert (
        hub.tree(REPO, "refs/pr/1")["model.safetensors.index.json"].read()
        == (overlay / "model.safetensors.index.json").read_bytes()
    )


def test_upload_refuses_bad_output_folders(overlay: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no glm5conv-manifest.json"):
        read_output(tmp_path / "source-repo")
    shard = next(overlay.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256 differs"):
        read_output(overlay)
    with pytest.raises(UsageError, match="--create-pr"):
        plan_upload(overlay, json.loads((overlay / "glm5conv-manifest.json").read_text()), TARGET,
                    base_card=None, revision="dev", create_pr=True)  # fmt: skip


def test_failed_commit_is_a_clear_error_and_a_rerun_sends_no_bytes_again(hub, source: str, overlay: Path) -> None:
    hub.fail_commits = 1
    proc = run_cli_process(["upload", overlay, TARGET], env=hub.env)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.startswith("glm5conv: error: hf://me/tiny-glm5-mtp:") and proc.stderr.count("\n") == 1
    assert "500" in proc.stderr and "Traceback" not in proc.stderr
    assert hub.commits == [] and hub.requests("PUT")
    sent_first = sum(r.received for r in hub.requests("PUT"))
    hub.log.clear()
    proc = run_cli_process(["upload", overlay, TARGET, "--json"], env=hub.env)
    assert proc.returncode == 0, proc.stderr
    assert hub.requests("PUT") == [] and sent_first > 0  # LFS objects were kept by the Hub
    assert json.loads(proc.stdout)["result"]["commit"] == hub.commits[0]["commit"]


def test_refused_server_side_copy(hub, source: str, overlay: Path, tmp_path: Path) -> None:
    hub.refuse_duplicates = True
    with pytest.raises(RemoteError, match=r"refused to copy 1 file\(s\).*convert without --overlay"):
        upload(overlay, TARGET)
    complete = tmp_path / "complete"
    convert_from_hub(HubRef(REPO), complete, ConvertOptions())
    plan, _ = upload(complete, TARGET)  # the files are here: uploaded instead
    copied = [op.path for op in plan.ops if op.action == "copy"]
    assert copied and all(hub.tree(TARGET)[name].read() == (complete / name).read_bytes() for name in copied)


def test_token_is_used_and_never_shown(hub, source: str, overlay: Path, tmp_path: Path) -> None:
    outputs = []
    for args in (
        ["convert", f"hf://{REPO}", tmp_path / "cli", "--overlay", "--verbose"],
        ["upload", overlay, TARGET, "--dry-run"],
        ["upload", overlay, TARGET, "--json"],
        ["upload", overlay, "someone/else", "--private"],
    ):
        proc = run_cli_process(args, env={**hub.env, "HF_HUB_VERBOSITY": "debug"})
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    hub.fail_commits = 1
    proc = run_cli_process(["upload", overlay, "me/other"], env=hub.env)
    outputs.append(proc.stdout + proc.stderr)
    wrong = run_cli_process(["upload", overlay, "me/third"], env={**hub.env, "HF_TOKEN": hub.token[:-1] + "x"})
    assert wrong.returncode == 6 and "401" in wrong.stderr
    outputs.append(wrong.stdout + wrong.stderr)
    assert all(hub.token not in out and hub.token[:-1] not in out for out in outputs)
    assert any(r.authorization == f"Bearer {hub.token}" for r in hub.log)  # it was sent, to the Hub only
