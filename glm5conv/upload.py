"""Publishing a converted checkpoint to the Hub in one commit, uploading only what changed.

The plan (pure) says which files are uploaded, which are carried over from the source
repository by a server-side copy (no bytes sent) and what the model card says; ``push`` carries
it out with huggingface_hub. The token is huggingface_hub's business (HF_TOKEN, the saved
login): glm5conv never reads, prints or logs it, and scrubs it from error messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, HfApi, hf_hub_download
from huggingface_hub.errors import FileDuplicationError

from glm5conv import __version__
from glm5conv.checkpoint import MANIFEST_NAME
from glm5conv.errors import BadInputError, RemoteError, UsageError, VerificationError
from glm5conv.hub import hub_api, hub_errors, scrub
from glm5conv.manifest import manifest_problems, read_manifest
from glm5conv.writer import JOURNAL_NAME, partial_dir

CARD_NAME = "README.md"
CARD_BEGIN = "<!-- glm5conv:begin -->"
CARD_END = "<!-- glm5conv:end -->"
CARRIED = ("in-source-repo", "unchanged")


@dataclass(frozen=True)
class UploadOp:
    action: str  # "upload": bytes are sent; "copy": carried over from the source repository on the Hub
    path: str
    size: int
    local: Path | None = None


@dataclass
class UploadPlan:
    folder: Path
    repo_id: str
    revision: str
    create_pr: bool
    private: bool
    manifest: dict[str, Any]
    card: str
    ops: list[UploadOp] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already in the repository (uploading to the source itself)

    @property
    def source(self) -> dict[str, str] | None:
        return self.manifest.get("source")

    @property
    def same_repo(self) -> bool:
        return self.source is not None and self.source["repo_id"] == self.repo_id

    @property
    def bytes_to_upload(self) -> int:
        return sum(op.size for op in self.ops if op.action == "upload")

    @property
    def bytes_copied(self) -> int:
        return sum(op.size for op in self.ops if op.action == "copy")

    def commit_message(self) -> str:
        mode = self.manifest.get("mode", {})
        origin = f" of {self.source['repo_id']}@{self.source['commit'][:12]}" if self.source else ""
        return f"glm5conv {__version__}: MTP layer to {mode.get('to')} (scope {mode.get('scope')}){origin}"

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "create_pr": self.create_pr,
            "source": self.source,
            "operations": [{"action": op.action, "path": op.path, "size": op.size} for op in self.ops],
            "kept_in_repo": self.kept,
            "bytes_to_upload": self.bytes_to_upload,
            "bytes_copied_on_hub": self.bytes_copied,
            "commit_message": self.commit_message(),
        }


def _card_section(manifest: dict[str, Any], repo_id: str) -> str:
    source = manifest.get("source")
    mode = manifest.get("mode", {})
    lines = [CARD_BEGIN, "## MTP weights converted by glm5conv", ""]
    if source:
        lines.append(
            f"This repository is [{source['repo_id']}](https://huggingface.co/{source['repo_id']}) at commit "
            f"`{source['commit']}` (revision `{source['revision']}`), with its MTP (NextN) layer "
            f"{manifest.get('mtp_layer')} converted by glm5conv {manifest.get('version')} "
            f"(`--to {mode.get('to')} --scope {mode.get('scope')}`) so that the engines' loaders build it."
        )
    else:
        lines.append(
            f"The MTP (NextN) layer {manifest.get('mtp_layer')} of this checkpoint was converted by glm5conv "
            f"{manifest.get('version')} (`--to {mode.get('to')} --scope {mode.get('scope')}`)."
        )
    lines += ["", "| module | change | before | after |", "|---|---|---|---|"]
    lines += [
        f"| `{c['module']}` | {c['action']} | {c['before']} | {c['after']} |" for c in manifest.get("changes", [])
    ]
    lines += ["", f"Files written by the conversion (sha256, as in `{MANIFEST_NAME}`):", ""]
    lines += ["| file | status | sha256 |", "|---|---|---|"]
    for name, record in sorted(manifest["files"].items()):
        if record.get("status") not in CARRIED:
            lines.append(f"| `{name}` | {record['status']} | `{record['sha256']}` |")
    carried = sum(1 for r in manifest["files"].values() if r.get("status") in CARRIED)
    lines += ["", f"The other {carried} file(s) are byte-identical to the source.", CARD_END]
    return "\n".join(lines) + "\n"


def model_card(base: str | None, manifest: dict[str, Any], repo_id: str) -> str:
    """The source's card with glm5conv's section added (or replaced, when converted again)."""
    section = _card_section(manifest, repo_id)
    if not base:
        source = manifest.get("source")
        front = f"---\nbase_model: {source['repo_id']}\ntags:\n- glm5conv\n---\n\n" if source else ""
        return front + section
    if CARD_BEGIN in base and CARD_END in base:
        head, _, rest = base.partition(CARD_BEGIN)
        _, _, tail = rest.partition(CARD_END)
        return head + section.rstrip("\n") + tail
    return base.rstrip("\n") + "\n\n" + section


def read_output(folder: Path) -> dict[str, Any]:
    """The manifest of a finished, intact conversion (refuse anything else)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    if partial_dir(folder).exists() or (folder / JOURNAL_NAME).exists():
        raise BadInputError(f"{folder}: an interrupted conversion; finish it (convert --resume) before uploading")
    manifest = read_manifest(folder)
    if manifest is None:
        raise BadInputError(f"{folder}: no {MANIFEST_NAME}; upload publishes the output of glm5conv convert")
    problems = manifest_problems(folder, manifest)
    if problems:
        raise VerificationError(f"{problems[0]} (not uploading a folder that disagrees with its manifest)")
    return manifest


def source_card(folder: Path, manifest: dict[str, Any], api: HfApi | None = None) -> str | None:
    """The source's model card: here for a complete conversion, fetched (small) for an overlay."""
    if CARD_NAME not in manifest["files"]:
        return None
    local = Path(folder) / CARD_NAME
    if local.is_file():
        return local.read_text(encoding="utf-8")
    source = manifest.get("source")
    if source is None:
        return None
    api = api or hub_api()
    with hub_errors(f"hf://{source['repo_id']}@{source['commit'][:12]}/{CARD_NAME}"):
        path = hf_hub_download(
            source["repo_id"], CARD_NAME, revision=source["commit"], endpoint=api.endpoint, token=api.token
        )
    return Path(path).read_text(encoding="utf-8")


def plan_upload(
    folder: Path,
    manifest: dict[str, Any],
    repo_id: str,
    *,
    base_card: str | None,
    revision: str | None = None,
    create_pr: bool = False,
    private: bool = False,
) -> UploadPlan:
    """Which files go up as bytes, which are copied on the Hub, which are already there."""
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main: give no --revision")
    plan = UploadPlan(
        Path(folder),
        repo_id,
        revision or "main",
        create_pr,
        private,
        manifest,
        model_card(base_card, manifest, repo_id),
    )
    for name, record in sorted(manifest["files"].items()):
        if name == CARD_NAME:
            continue
        if record.get("status") in CARRIED and plan.source is not None:
            if plan.same_repo:
                plan.kept.append(name)
            else:
                plan.ops.append(UploadOp("copy", name, record["size"]))
        elif record.get("status") == "in-source-repo":
            raise BadInputError(f"{folder / MANIFEST_NAME}: '{name}' is in the source repository, which is not named")
        else:
            plan.ops.append(UploadOp("upload", name, record["size"], plan.folder / name))
    manifest_path = plan.folder / MANIFEST_NAME
    plan.ops.append(UploadOp("upload", MANIFEST_NAME, manifest_path.stat().st_size, manifest_path))
    plan.ops.append(UploadOp("upload", CARD_NAME, len(plan.card.encode())))
    return plan


def _operations(plan: UploadPlan, copy: bool) -> list[CommitOperationAdd | CommitOperationCopy]:
    ops: list[CommitOperationAdd | CommitOperationCopy] = []
    for op in plan.ops:
        if op.path == CARD_NAME:
            ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=plan.card.encode()))
        elif op.action == "copy" and copy:
            ops.append(
                CommitOperationCopy(
                    src_path_in_repo=op.path,
                    path_in_repo=op.path,
                    src_revision=plan.source["commit"],
                    src_repo_id=plan.source["repo_id"],
                    src_repo_type="model",
                )
            )
        else:
            ops.append(CommitOperationAdd(path_in_repo=op.path, path_or_fileobj=str(plan.folder / op.path)))
    return ops


def _commit(plan: UploadPlan, api: HfApi, copy: bool) -> Any:
    with hub_errors(f"hf://{plan.repo_id}"):
        return api.create_commit(
            plan.repo_id,
            _operations(plan, copy),
            commit_message=plan.commit_message(),
            commit_description=f"Made by glm5conv {__version__}; see {CARD_NAME} and {MANIFEST_NAME}.",
            revision=plan.revision,
            create_pr=plan.create_pr,
            parent_commit=plan.source["commit"] if plan.same_repo else None,
        )


def push(plan: UploadPlan, api: HfApi | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Create the repository if needed and make the one commit; returns its id and URLs.

    Where the Hub refuses a server-side copy (another storage region), files that are here are
    uploaded instead; an overlay lacks them, and says so.
    """
    api = api or hub_api()
    where = f"hf://{plan.repo_id}"
    with hub_errors(where):
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
    try:
        info = _commit(plan, api, copy=True)
    except (FileDuplicationError, ValueError) as exc:
        if isinstance(exc, ValueError) and "duplicate" not in str(exc):
            raise
        copies = [op for op in plan.ops if op.action == "copy"]
        if any(not (plan.folder / op.path).is_file() for op in copies):
            raise RemoteError(
                f"{where}: the Hub refused to copy {len(copies)} file(s) ({sum(op.size for op in copies):,} bytes) "
                f"from {plan.source['repo_id']} ({scrub(exc)}); they are not in {plan.folder} to upload instead: "
                "convert without --overlay, then upload that folder"
            ) from None
        if say is not None:
            say(f"the Hub refused server-side copies; uploading {len(copies)} file(s) from {plan.folder} instead")
        info = _commit(plan, api, copy=False)
    return {"commit": info.oid, "commit_url": info.commit_url, "pr_url": info.pr_url}
