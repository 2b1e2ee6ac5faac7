"""The Hugging Face Hub as a source: name a repository, fetch only what a conversion reads.

A conversion reads config.json, the index and the shard(s) it rewrites; the rest of a 430 GB
repository need not leave the Hub. The plan is made from the index and the MTP shards' headers
(ranged reads of a few hundred KB each), and only then are the shards it rewrites fetched. Files
go into the Hugging Face cache through huggingface_hub: shared with every other tool, reused on
the next run, a dropped connection resumed where it stopped (huggingface_hub retries with a
Range request). A run stopped mid-file keeps the files it finished; the one it was fetching
starts again from its beginning (huggingface_hub 2.x does not keep partial files across runs).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HfUriError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, parse_hf_uri, tqdm, validate_repo_id

from glm5conv import __version__
from glm5conv.architecture import model_layout
from glm5conv.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME, RemoteFile, load_json
from glm5conv.convert import ConvertResult, convert
from glm5conv.errors import BadInputError, OutputError, RemoteError, UsageError
from glm5conv.plan import ConvertOptions
from glm5conv.shard import MAX_HEADER_BYTES, ShardHeader, parse_header
from glm5conv.writer import NoProgress, Progress, WriteOptions

HUB_SCHEME = "hf://"
HEADER_PROBE_BYTES = 1 << 18  # one request covers the header of a typical shard
FETCH_WORKERS = 4


@dataclass(frozen=True)
class HubRef:
    """A model repository on the Hub, at a revision (a branch, tag, PR ref or commit; None: main)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef | None:
    """``hf://OWNER/NAME[@REVISION]``, or a bare ``OWNER/NAME`` that names no local path; else None."""
    if text.startswith(HUB_SCHEME):
        try:
            uri = parse_hf_uri(text)
        except HfUriError as exc:
            raise UsageError(f"{text}: not a Hub repository ({' '.join(str(exc).split())})") from None
        if uri.type != "model" or uri.path_in_repo:
            raise UsageError(f"{text}: name a model repository (hf://OWNER/NAME[@REVISION]), not a file or dataset")
        return HubRef(uri.id, uri.revision)
    if os.path.exists(text) or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return None
    repo_id, _, revision = text.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubRef(repo_id, revision or None)


@dataclass
class RemoteRepo:
    """A repository's files at one commit, as the Hub lists them."""

    ref: HubRef
    commit: str
    files: dict[str, RemoteFile]

    def source_record(self) -> dict[str, str]:
        """What the manifest and the model card say about where a conversion came from."""
        return {"repo_id": self.ref.repo_id, "revision": self.ref.revision or "main", "commit": self.commit}

    def label(self, name: str = "") -> str:
        return f"{HUB_SCHEME}{self.ref.repo_id}@{self.commit[:12]}" + (f"/{name}" if name else "")


@dataclass
class FetchPlan:
    """Which files a conversion reads from the Hub, and which of them the cache already holds."""

    to_fetch: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    repo_bytes: int = 0

    @property
    def bytes_to_fetch(self) -> int:
        return sum(self.to_fetch.values())

    @property
    def bytes_left_on_hub(self) -> int:
        return self.repo_bytes - self.bytes_to_fetch - sum(self.cached.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "files_to_fetch": sorted(self.to_fetch),
            "bytes_to_fetch": self.bytes_to_fetch,
            "files_cached": sorted(self.cached),
            "bytes_cached": sum(self.cached.values()),
            "bytes_left_on_hub": self.bytes_left_on_hub,
            "repo_bytes": self.repo_bytes,
        }


def hub_api() -> HfApi:
    """The client; endpoint and token come from where huggingface_hub looks (HF_ENDPOINT, HF_TOKEN, login)."""
    return HfApi(library_name="glm5conv", library_version=__version__)


def scrub(text: str) -> str:
    """One line, with any token huggingface_hub knows replaced: errors may echo request details."""
    line = " ".join(str(text).split())
    token = huggingface_hub.get_token()
    return line.replace(token, "***") if token else line


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into glm5conv's one-line errors."""
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise RemoteError(f"{what}: cannot reach the Hub ({scrub(exc)})") from None
    except RepositoryNotFoundError:
        raise BadInputError(
            f"{what}: repository not found on the Hub (or private or gated: log in or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise BadInputError(f"{what}: revision not found on the Hub") from None
    except EntryNotFoundError:
        raise BadInputError(f"{what}: file not found on the Hub") from None
    except HfHubHTTPError as exc:
        raise RemoteError(f"{what}: {scrub(exc)}") from None
    except OSError as exc:
        if exc.errno is not None:  # disk full or unwritable cache, not the network
            raise OutputError(f"{what}: {scrub(exc)}") from None
        raise RemoteError(f"{what}: {scrub(exc)}") from None
    except Exception as exc:
        if _is_network(exc):  # connection refused, reset, timeout
            raise RemoteError(f"{what}: {exc.__class__.__name__}: {scrub(exc)}") from None
        if isinstance(exc, RuntimeError) and _is_network(exc.__cause__):  # huggingface_hub's upload wrapper
            raise RemoteError(f"{what}: {scrub(exc)} ({scrub(exc.__cause__)})") from None
        raise


def _is_network(exc: BaseException | None) -> bool:
    return isinstance(exc, HfHubHTTPError) or (exc is not None and type(exc).__module__.startswith("httpx"))


def list_repo(ref: HubRef, api: HfApi | None = None) -> RemoteRepo:
    """Resolve the revision to a commit and list every file with its size and (LFS) sha256."""
    api = api or hub_api()
    with hub_errors(str(ref)):
        info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    files = {s.rfilename: RemoteFile(s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or ()}
    if not info.sha:
        raise RemoteError(f"{ref}: the Hub did not say which commit the revision is at")
    return RemoteRepo(ref, info.sha, files)


def cached_path(repo: RemoteRepo, name: str) -> Path | None:
    found = try_to_load_from_cache(repo.ref.repo_id, name, revision=repo.commit)
    return Path(found) if isinstance(found, str) else None


def _bridge(progress: Progress) -> type[tqdm]:
    """huggingface_hub reports bytes through a tqdm class: route them to our progress."""

    class Bridge(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            progress.advance(int(n or 0))
            return None

    return Bridge


def fetch(repo: RemoteRepo, names: Iterable[str], progress: Progress | None = None, api: HfApi | None = None) -> Path:
    """Fetch ``names`` at the listed commit into the HF cache; returns the snapshot folder."""
    progress = progress or NoProgress()
    api = api or hub_api()
    names = sorted(names)
    missing = [n for n in names if cached_path(repo, n) is None]
    if missing:
        total = sum(repo.files[n].size for n in missing)
        progress.say(f"fetching {len(missing)} file(s), {total:,} bytes, from {repo.label()}")
        progress.file(f"fetching from {repo.ref.repo_id}", total)
        bridge = _bridge(progress)

        def one(name: str) -> None:
            with hub_errors(repo.label(name)):
                hf_hub_download(
                    repo.ref.repo_id,
                    name,
                    revision=repo.commit,
                    endpoint=api.endpoint,
                    token=api.token,
                    library_name="glm5conv",
                    library_version=__version__,
                    tqdm_class=bridge,
                )

        with ThreadPoolExecutor(FETCH_WORKERS) as pool:
            list(pool.map(one, missing))
    return snapshot_folder(repo)


def snapshot_folder(repo: RemoteRepo) -> Path:
    """The cache's folder for the commit (config.json is always fetched first)."""
    config = cached_path(repo, CONFIG_NAME)
    if config is None:
        raise RemoteError(f"{repo.label(CONFIG_NAME)}: not in the Hugging Face cache after fetching it")
    return config.parent


def _ranged_read(url: str, headers: dict[str, str], start: int, stop: int, what: str) -> bytes:
    """Bytes [start, stop) of a remote file; stops reading if the server ignores Range."""
    chunks: list[bytes] = []
    got = 0
    with (
        hub_errors(what),
        get_session().stream(
            "GET", url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"}, follow_redirects=True
        ) as response,
    ):
        huggingface_hub.utils.hf_raise_for_status(response)
        skip = start if response.status_code == 200 else 0
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            got += len(chunk)
            if got >= skip + stop - start:
                break
    return b"".join(chunks)[skip : skip + stop - start]


def fetch_header(repo: RemoteRepo, name: str, root: Path, api: HfApi | None = None) -> ShardHeader:
    """One shard's header by ranged reads, without its data."""
    api = api or hub_api()
    what = repo.label(name)
    size = repo.files[name].size
    url = hf_hub_url(repo.ref.repo_id, name, revision=repo.commit, endpoint=api.endpoint)
    headers = build_hf_headers(token=api.token, library_name="glm5conv", library_version=__version__)
    raw = _ranged_read(url, headers, 0, min(size, HEADER_PROBE_BYTES), what)
    if len(raw) < 8:
        raise BadInputError(f"{what}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise BadInputError(f"{what}: header length {header_len} does not fit the file ({size} bytes)")
    if 8 + header_len > len(raw):
        raw += _ranged_read(url, headers, len(raw), 8 + header_len, what)
    try:
        return parse_header(root / name, raw[8 : 8 + header_len], header_len, size)
    except BadInputError as exc:
        raise BadInputError(str(exc).replace(str(root / name), what)) from None


def mtp_shards(root: Path, files: Iterable[str]) -> list[str]:
    """The shards that hold MTP-layer tensors, by the index (the only ones a plan looks into)."""
    layout = model_layout(load_json(root / CONFIG_NAME), root / CONFIG_NAME)
    if INDEX_NAME not in files:
        return [SINGLE_FILE_NAME]
    index = load_json(root / INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise BadInputError(f"{root / INDEX_NAME}: no weight_map")
    prefixes = tuple(layout.mtp_prefix(layer) for layer in layout.mtp_layers)
    return sorted({str(shard) for tensor, shard in weight_map.items() if tensor.startswith(prefixes)})


def remote_checkpoint_files(
    repo: RemoteRepo, progress: Progress | None = None, api: HfApi | None = None
) -> tuple[Path, dict[str, RemoteFile]]:
    """Fetch config and index; return the snapshot folder and every file, MTP shards with headers."""
    if CONFIG_NAME not in repo.files:
        raise BadInputError(f"{repo.label()}: no {CONFIG_NAME} in the repository (is it a model checkpoint?)")
    if INDEX_NAME not in repo.files and SINGLE_FILE_NAME not in repo.files:
        raise BadInputError(f"{repo.label()}: neither {INDEX_NAME} nor {SINGLE_FILE_NAME} in the repository")
    root = fetch(repo, [CONFIG_NAME] + ([INDEX_NAME] if INDEX_NAME in repo.files else []), progress, api)
    files = dict(repo.files)
    for name in mtp_shards(root, repo.files):
        if name not in files:
            raise BadInputError(f"{repo.label(INDEX_NAME)}: weight_map names '{name}', which the repository lacks")
        if cached_path(repo, name) is None:
            files[name] = replace(files[name], header=fetch_header(repo, name, root, api))
    return root, files


def fetch_plan(repo: RemoteRepo, needed: Iterable[str]) -> FetchPlan:
    plan = FetchPlan(repo_bytes=sum(f.size for f in repo.files.values()))
    for name in sorted(set(needed)):
        (plan.cached if cached_path(repo, name) is not None else plan.to_fetch)[name] = repo.files[name].size
    return plan


def convert_from_hub(
    ref: HubRef,
    dst: Path | None,
    options: ConvertOptions,
    *,
    overlay: bool = False,
    write: WriteOptions | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    api: HfApi | None = None,
) -> ConvertResult:
    """Convert a Hub repository: plan from the index and MTP headers, fetch only what is needed, convert.

    ``overlay``: DST holds only the files that differ (and the manifest, which names the source
    commit); otherwise every file is fetched (or found in the cache) and DST is complete, its
    unchanged files hard-linked from the cache.
    """
    write = write or WriteOptions()
    if write.in_place:
        raise UsageError("--in-place rewrites a local folder; convert a Hub repository into a DST folder")
    if dst is None:
        raise UsageError("missing DST: the folder to write the converted checkpoint into")
    api = api or hub_api()
    repo = list_repo(ref, api)
    root, remote = remote_checkpoint_files(repo, progress, api)
    source = repo.source_record()
    planned = convert(root, dst, options, write=write, dry_run=True, remote_files=remote, source=source)
    needed = planned.plan.rewritten_files if overlay else list(repo.files)
    fetching = fetch_plan(repo, needed if planned.status == "dry-run" else ())
    hub = {**source, "overlay": overlay, **fetching.to_json()}
    if dry_run or planned.status != "dry-run":
        planned.hub = hub
        return planned
    fetch(repo, fetching.to_fetch, progress, api)
    result = convert(
        root, dst, options, write=write, progress=progress, remote_files=remote if overlay else None, source=source
    )
    result.hub = hub
    return result


def overlay_files(folder: Path, manifest: dict[str, Any], api: HfApi | None = None) -> dict[str, RemoteFile]:
    """An overlay's files that stay in its source repository; MTP shards with headers (ranged reads)."""
    source = manifest.get("source") or {}
    if "repo_id" not in source or "commit" not in source:
        raise BadInputError(f"{folder}: an overlay whose manifest does not name its source repository")
    files = {
        name: RemoteFile(record["size"], record.get("sha256"))
        for name, record in manifest["files"].items()
        if record.get("status") == "in-source-repo"
    }
    repo = RemoteRepo(HubRef(source["repo_id"], source["commit"]), source["commit"], files)
    if not (folder / CONFIG_NAME).is_file() or (INDEX_NAME in files):
        raise BadInputError(f"{folder}: an overlay without its own {CONFIG_NAME} and {INDEX_NAME}")
    for name in mtp_shards(folder, [INDEX_NAME]):
        if name in files:
            files[name] = replace(files[name], header=fetch_header(repo, name, folder, api))
    return files
