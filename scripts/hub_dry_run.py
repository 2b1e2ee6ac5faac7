"""Plan converting hf://amd/GLM-5-MXFP4 from a synthetic copy of its repository: bytes fetched, written, uploaded.

The real repository cannot be reached from CI, so this serves a synthetic checkpoint with its
structure (scripts/make_synthetic_glm5.py: real config, index, 282 shard names and sizes) from
the local Hub of the tests (tests/fake_hub.py) under the name amd/GLM-5-MXFP4, and runs the real
commands against it with huggingface_hub's client:

  glm5conv convert hf://amd/GLM-5-MXFP4 OUT --overlay --scope S --dry-run --json   (both scopes)
  glm5conv convert hf://amd/GLM-5-MXFP4 OUT --overlay                              (eh-proj, unless --plan-only)
  glm5conv upload OUT me/GLM-5-MXFP4-mtp --dry-run --json

The Hub lists a sha256 for every LFS file; hashing 430 GB of stand-in shards would take minutes
and tells nothing, so shards that hold no MTP tensor are listed with a digest of their name and
size (never fetched, never checked). The MTP shards get their real sha256.

Usage: python scripts/hub_dry_run.py SYNTHETIC_FOLDER [--plan-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.fake_hub import FakeHub, file_sha256  # noqa: E402

SOURCE = "amd/GLM-5-MXFP4"


def glm5conv(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "glm5conv", *args], capture_output=True, text=True, env={**os.environ, **env}
    )
    if proc.returncode != 0:
        sys.exit(f"glm5conv {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plan-only", action="store_true", help="skip the eh-proj conversion and upload dry run")
    args = parser.parse_args()
    index = json.loads((args.folder / "model.safetensors.index.json").read_text())
    config = json.loads((args.folder / "config.json").read_text())
    mtp_prefix = f"model.layers.{config['num_hidden_layers']}."
    mtp_shards = {s for t, s in index["weight_map"].items() if t.startswith(mtp_prefix)}

    def sha256(path: Path) -> str:
        if path.name in mtp_shards:
            return file_sha256(path)
        return hashlib.sha256(f"stand-in {path.name} {path.stat().st_size}".encode()).hexdigest()

    work = Path(tempfile.mkdtemp(prefix="glm5conv-hub-"))
    token = "hf_dry_run_token"
    with FakeHub(work / "hub", token) as hub:
        hub.add_repo(SOURCE, args.folder, sha256=sha256)
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_CACHE": str(work / "cache"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": token,
        }
        repo_bytes = sum(b.size for b in hub.tree(SOURCE).values())
        rows = []
        for scope in ("eh-proj", "mtp"):
            hub.log.clear()
            plan = glm5conv(["convert", f"hf://{SOURCE}", str(work / scope), "--overlay", "--scope", scope,
                             "--dry-run", "--json"], env)  # fmt: skip
            rows.append((f"convert --overlay --scope {scope} --dry-run", len(plan["hub"]["files_to_fetch"]),
                         plan["hub"]["bytes_to_fetch"], plan["bytes_to_write"], None, hub.bytes_served()))  # fmt: skip
        if not args.plan_only:
            hub.log.clear()
            out = work / "eh-proj"
            result = glm5conv(["convert", f"hf://{SOURCE}", str(out), "--overlay", "--json"], env)
            fetched = hub.bytes_served()
            upload = glm5conv(["upload", str(out), "me/GLM-5-MXFP4-mtp", "--dry-run", "--json"], env)
            rows.append(("convert --overlay --scope eh-proj; upload --dry-run", len(result["hub"]["files_to_fetch"]),
                         fetched, result["bytes_to_write"], upload["bytes_to_upload"], None))  # fmt: skip
            copied = upload["bytes_copied_on_hub"]
    print(f"source: hf://{SOURCE} (synthetic copy: {len(hub.tree(SOURCE))} files, {gb(repo_bytes)})")
    print(
        "| command | files fetched | bytes fetched | shard bytes written | bytes to upload | dry run's reads (config, index, MTP headers) |"
    )
    print("|---|---|---|---|---|---|")
    for command, files, fetched, written, uploaded, headers in rows:
        cells = ["" if v is None else gb(v) for v in (fetched, written, uploaded)]
        reads = "" if headers is None else f"{headers / 1e6:.1f} MB"
        print(f"| {command} | {files} | {cells[0]} | {cells[1]} | {cells[2] or '(plan only)'} | {reads} |")
    if not args.plan_only:
        print(f"upload: {gb(copied)} carried over by server-side copies from {SOURCE} (no bytes sent)")


if __name__ == "__main__":
    main()
