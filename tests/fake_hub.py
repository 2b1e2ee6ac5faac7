"""A local stand-in for the Hugging Face Hub's HTTP API, for tests of glm5conv.hub and glm5conv.upload.

It serves the subset huggingface_hub's client calls for downloads (repo info with file
metadata, resolve with the headers the client checks and Range) and for uploads with Xet
disabled (create repo, branch, preupload, LFS batch + PUT, paths-info, cross-repo LFS
duplicate, commit with PRs and parent checks), backed by a folder. Every request is logged so
tests can count what was fetched and sent. Faults can be injected: a connection that drops
mid-file, a commit that fails, a duplicate the Hub refuses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
LFS_MIN_SIZE = 10 << 20


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Blob:
    """A file in a commit: LFS content lives in a file, regular content inline."""

    size: int
    sha256: str | None = None  # LFS files only
    path: Path | None = None
    data: bytes | None = None

    @property
    def oid(self) -> str:
        if self.sha256 is None:
            return git_blob_id(self.data or b"")
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        return git_blob_id(pointer.encode())

    def read(self) -> bytes:
        return self.data if self.data is not None else Path(self.path).read_bytes()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    prs: int = 0


@dataclass
class Logged:
    method: str
    path: str
    range: str | None = None
    sent: int = 0
    received: int = 0
    status: int = 0
    authorization: str | None = None


class FakeHub:
    def __init__(self, root: Path, token: str) -> None:
        self.root = Path(root)
        self.store = self.root / "lfs"
        self.store.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.log: list[Logged] = []
        self.commits: list[dict[str, Any]] = []  # every commit request, parsed
        self.drop_after: dict[str, list[int]] = {}  # path -> bytes to send before dropping, one per GET
        self.fail_gets: dict[str, list[int]] = {}  # path -> HTTP status to answer, one per GET
        self.fail_commits = 0
        self.refuse_duplicates = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(
        self, repo_id: str, folder: Path, *, private: bool = False, sha256: Callable[[Path], str] = file_sha256
    ) -> str:
        """A repository whose main branch holds ``folder``'s files; returns the commit.

        ``sha256`` gives an LFS file's hash (what the Hub lists); scripts serving a 430 GB
        synthetic checkpoint pass a cheaper stand-in for files that are never fetched.
        """
        tree: dict[str, Blob] = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            size = path.stat().st_size
            if name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE:
                tree[name] = Blob(size, sha256(path), path)
            else:
                tree[name] = Blob(size, data=path.read_bytes())
        repo = Repo(private=private)
        self.repos[repo_id] = repo
        repo.lfs |= {b.sha256 for b in tree.values() if b.sha256}
        return self._commit(repo, "main", tree, "initial")

    def _commit(self, repo: Repo, branch: str, tree: dict[str, Blob], message: str) -> str:
        commit = hashlib.sha1(f"{len(self.commits)}{message}{sorted(tree)}{len(repo.commits)}".encode()).hexdigest()
        repo.commits[commit] = tree
        repo.branches[branch] = commit
        return commit

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, Blob]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]

    def requests(self, method: str, fragment: str = "") -> list[Logged]:
        return [r for r in self.log if r.method == method and fragment in r.path]

    def bytes_served(self, fragment: str = "/resolve/") -> int:
        return sum(r.sent for r in self.log if r.method == "GET" and fragment in r.path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                """Silent: tests read FakeHub.log instead."""

            # -- plumbing -------------------------------------------------------------
            def _entry(self) -> Logged:
                entry = Logged(
                    self.command, self.path, self.headers.get("Range"), authorization=self.headers.get("Authorization")
                )
                with hub._lock:
                    hub.log.append(entry)
                return entry

            def _body(self, entry: Logged) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                entry.received = len(data)
                return data

            def _reply(
                self, entry: Logged, status: int, body: Any = b"", headers: dict[str, str] | None = None
            ) -> None:
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                entry.status = status
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                    entry.sent = len(body)

            def _error(self, entry: Logged, status: int, code: str, message: str) -> None:
                self._reply(entry, status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def _authorized(self, entry: Logged) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._reply(entry, 401, {"error": "Invalid credentials in Authorization header"})
                return False

            def _repo(self, entry: Logged, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and self.headers.get("Authorization") != f"Bearer {hub.token}"):
                    self._error(entry, 404, "RepoNotFound", "Repository not found")
                    return None
                return repo

            def _at(self, entry: Logged, repo_id: str, revision: str) -> tuple[Repo, str] | None:
                """The repository and the commit a revision names, or None once the error is sent."""
                repo = self._repo(entry, repo_id)
                if repo is None:
                    return None
                commit = repo.branches.get(revision, revision if revision in repo.commits else None)
                if commit is None:
                    self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo, commit

            # -- routes -----------------------------------------------------------------
            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                entry = self._entry()
                parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(self.path).path.split("/")[1:]]
                if parts[:2] == ["api", "models"]:
                    repo_id = "/".join(parts[2:4])
                    revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                    return self._model_info(entry, repo_id, revision)
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file(entry, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                self._reply(entry, 404, {"error": "no route"})

            def do_POST(self) -> None:
                entry = self._entry()
                url = urllib.parse.urlsplit(self.path)
                parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
                query = urllib.parse.parse_qs(url.query)
                body = self._body(entry)
                if parts == ["api", "repos", "create"]:
                    return self._create_repo(entry, json.loads(body))
                if parts == ["api", "validate-yaml"]:
                    return self._reply(entry, 200, {"errors": [], "warnings": []})
                if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                    return self._lfs_batch(entry, f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body))
                if parts[:2] == ["api", "models"] and len(parts) >= 5:
                    repo_id, action = "/".join(parts[2:4]), parts[4]
                    rest = "/".join(parts[5:])
                    if action == "paths-info":
                        return self._paths_info(entry, repo_id, rest, urllib.parse.parse_qs(body.decode()))
                    if action == "preupload":
                        return self._preupload(entry, repo_id, rest, json.loads(body))
                    if action == "commit":
                        return self._commit_route(entry, repo_id, rest, body, "create_pr" in query)
                    if action == "branch":
                        return self._branch(entry, repo_id, rest)
                    if action == "lfs-files" and rest == "duplicate":
                        return self._duplicate(entry, repo_id, json.loads(body))
                self._reply(entry, 404, {"error": "no route"})

            def do_PUT(self) -> None:
                entry = self._entry()
                parts = urllib.parse.urlsplit(self.path).path.split("/")[1:]
                if parts[0] != "lfs-upload":  # a presigned URL, as the Hub's storage gives: no token
                    return self._reply(entry, 404, {"error": "no route"})
                repo_id, oid = "/".join(parts[1:3]), parts[3]
                data = self._body(entry)
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._reply(entry, 400, {"error": "sha256 mismatch"})
                (hub.store / oid).write_bytes(data)
                hub.repos[repo_id].lfs.add(oid)
                self._reply(entry, 200, b"")

            # -- downloads ------------------------------------------------------------
            def _model_info(self, entry: Logged, repo_id: str, revision: str) -> None:
                found = self._at(entry, repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                siblings = []
                for name, blob in sorted(repo.commits[commit].items()):
                    sibling: dict[str, Any] = {"rfilename": name, "size": blob.size, "blobId": blob.oid}
                    if blob.sha256:
                        sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": 134}
                    siblings.append(sibling)
                self._reply(entry, 200, {"id": repo_id, "sha": commit, "private": repo.private, "siblings": siblings})

            def _file(self, entry: Logged, repo_id: str, revision: str, name: str) -> None:
                found = self._at(entry, repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                blob = repo.commits[commit].get(name)
                if blob is None:
                    return self._error(entry, 404, "EntryNotFound", f"{name} does not exist")
                headers = {"X-Repo-Commit": commit, "ETag": f'"{blob.sha256 or blob.oid}"', "Accept-Ranges": "bytes"}
                if blob.sha256:
                    headers["X-Linked-Etag"] = f'"{blob.sha256}"'
                    headers["X-Linked-Size"] = str(blob.size)
                with hub._lock:
                    failures = hub.fail_gets.get(name) if self.command == "GET" else None
                    failure = failures.pop(0) if failures else None
                if failure is not None:
                    return self._reply(entry, failure, {"error": "Forbidden by the test"})
                start, stop, status = 0, blob.size, 200
                wanted = self.headers.get("Range")
                if wanted and self.command == "GET":
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, stop, status = int(first), min(blob.size, int(last) + 1 if last else blob.size), 206
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
                entry.status = status
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(stop - start))
                self.end_headers()
                if self.command == "HEAD":
                    return
                with hub._lock:
                    drops = hub.drop_after.get(name)
                    limit = drops.pop(0) if drops else None
                with open(blob.path, "rb") if blob.path else nullcontext() as src:
                    position = start
                    while position < stop:
                        n = min(1 << 20, stop - position)
                        if limit is not None:
                            n = min(n, start + limit - position)
                            if n <= 0:
                                self.close_connection = True
                                self.wfile.flush()
                                self.connection.shutdown(2)
                                return
                        if src is not None:
                            src.seek(position)
                            chunk = src.read(n)
                        else:
                            chunk = blob.data[position : position + n]
                        self.wfile.write(chunk)
                        position += len(chunk)
                        entry.sent += len(chunk)

            # -- uploads -------------------------------------------------------------
            def _create_repo(self, entry: Logged, payload: dict[str, Any]) -> None:
                if not self._authorized(entry):
                    return
                repo_id = f"{payload['organization']}/{payload['name']}"
                if repo_id in hub.repos:
                    return self._reply(
                        entry, 409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}
                    )
                repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
                hub.repos[repo_id] = repo
                hub._commit(repo, "main", {}, "initial")
                self._reply(entry, 200, {"url": f"{hub.endpoint}/{repo_id}"})

            def _branch(self, entry: Logged, repo_id: str, branch: str) -> None:
                repo = self._repo(entry, repo_id)
                if repo is None or not self._authorized(entry):
                    return
                if branch in repo.branches:
                    return self._reply(entry, 409, {"error": "Reference already exists"})
                repo.branches[branch] = repo.branches["main"]
                self._reply(entry, 200, {})

            def _paths_info(self, entry: Logged, repo_id: str, revision: str, form: dict[str, list[str]]) -> None:
                found = self._at(entry, repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                tree = repo.commits[commit]
                found = []
                for name in form.get("paths", []):
                    blob = tree.get(name)
                    if blob is None:
                        continue
                    info: dict[str, Any] = {"type": "file", "path": name, "size": blob.size, "oid": blob.oid}
                    if blob.sha256:
                        info["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
                        info["xetHash"] = hashlib.sha256(b"xet" + blob.sha256.encode()).hexdigest()
                    found.append(info)
                self._reply(entry, 200, found)

            def _preupload(self, entry: Logged, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
                repo = self._repo(entry, repo_id)
                if repo is None or not self._authorized(entry):
                    return
                tree = repo.commits.get(repo.branches.get(revision, ""), {})
                files = []
                for f in payload["files"]:
                    lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                    blob = tree.get(f["path"])
                    oid = None if blob is None else (blob.sha256 if lfs else blob.oid)
                    files.append(
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": oid,
                        }
                    )
                self._reply(entry, 200, {"files": files})

            def _lfs_batch(self, entry: Logged, repo_id: str, payload: dict[str, Any]) -> None:
                repo = self._repo(entry, repo_id)
                if repo is None or not self._authorized(entry):
                    return
                objects = []
                for obj in payload["objects"]:
                    item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in repo.lfs:
                        href = f"{hub.endpoint}/lfs-upload/{repo_id}/{obj['oid']}"
                        item["actions"] = {"upload": {"href": href}}
                    objects.append(item)
                self._reply(entry, 200, {"transfer": "basic", "objects": objects})

            def _duplicate(self, entry: Logged, src_repo_id: str, payload: dict[str, Any]) -> None:
                source = self._repo(entry, src_repo_id)
                if source is None or not self._authorized(entry):
                    return
                target = hub.repos.get(payload["target"]["name"])
                if target is None:
                    return self._error(entry, 404, "RepoNotFound", "target repository not found")
                known = {b.sha256 for tree in source.commits.values() for b in tree.values() if b.sha256}
                failed = []
                for f in payload["files"]:
                    if hub.refuse_duplicates or f["sha256"] not in known:
                        failed.append({"sha256": f["sha256"], "error": "cannot duplicate across storage regions"})
                    else:
                        target.lfs.add(f["sha256"])
                self._reply(entry, 200, {"failed": failed})

            def _commit_route(self, entry: Logged, repo_id: str, revision: str, body: bytes, create_pr: bool) -> None:
                repo = self._repo(entry, repo_id)
                if repo is None or not self._authorized(entry):
                    return
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    return self._reply(entry, 500, {"error": "Internal Error - We're working hard to fix this"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = lines[0]["value"]
                head = repo.branches.get(revision)
                if head is None:
                    return self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                parent = header.get("parentCommit") or head
                if not create_pr and parent != head:
                    return self._reply(
                        entry, 412, {"error": "A commit has happened since. Please refresh and try again."}
                    )
                tree = dict(repo.commits[parent])
                record: dict[str, Any] = {"repo": repo_id, "revision": revision, "create_pr": create_pr, "ops": []}
                for line in lines[1:]:
                    key, value = line["key"], line["value"]
                    if key == "file":
                        data = base64.b64decode(value["content"])
                        tree[value["path"]] = Blob(len(data), data=data)
                    elif key == "lfsFile":
                        oid = value["oid"]
                        if oid not in repo.lfs:
                            return self._reply(entry, 400, {"error": f"LFS object {oid} not found in {repo_id}"})
                        tree[value["path"]] = Blob(self._lfs_size(oid), oid, self._lfs_path(oid))
                    elif key == "deletedFile":
                        tree.pop(value["path"], None)
                    record["ops"].append((key, value["path"]))
                branch = revision
                pr_url = None
                if create_pr:
                    repo.prs += 1
                    branch = f"refs/pr/{repo.prs}"
                    pr_url = f"{hub.endpoint}/{repo_id}/discussions/{repo.prs}"
                commit = hub._commit(repo, branch, tree, header["summary"])
                record["commit"] = commit
                record["summary"] = header["summary"]
                hub.commits.append(record)
                self._reply(
                    entry,
                    200,
                    {
                        "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit}",
                        "commitOid": commit,
                        "pullRequestUrl": pr_url,
                    },
                )

            def _lfs_path(self, oid: str) -> Path:
                stored = hub.store / oid
                if stored.exists():
                    return stored
                for repo in hub.repos.values():
                    for tree in repo.commits.values():
                        for blob in tree.values():
                            if blob.sha256 == oid and blob.path is not None:
                                return blob.path
                raise KeyError(oid)

            def _lfs_size(self, oid: str) -> int:
                return self._lfs_path(oid).stat().st_size

        return Handler
