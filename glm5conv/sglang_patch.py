"""Patch installed SGLang releases that lack the MTP fixes (``glm5conv sglang-patch``).

Two fixes, written for glm5conv after reading what SGLang later shipped:
- up to 0.5.10, ``eh_proj`` is a plain ``nn.Linear``: build it as a Quark-aware ``ReplicatedLinear``
  when the checkpoint is Quark (what PR #23219 did in 0.5.11), so an FP4 ``eh_proj`` loads;
- up to 0.5.15, exclude entries written as ``model.layers.N.<module>`` never reach the draft's own
  module names: add ``model.<name>`` / ``model.decoder.<name>`` for each (what PR #30265 did in
  0.5.16 for GLM), plus the fused names and ``model.decoder.mlp.experts``, so a bf16 MTP layer
  excluded under checkpoint names loads.

The file is changed on disk (``sglang/srt/models/deepseek_nextn.py``), so every SGLang process,
the spawned TP workers included, imports the patched code. Only files whose sha256 is that of a
release read here are touched; the original is kept beside it and restored byte for byte.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from glm5conv.errors import UsageError

TARGET = Path("srt/models/deepseek_nextn.py")
BACKUP_SUFFIX = ".glm5conv-orig"
MARK = "# glm5conv sglang-patch"

# sha256 of deepseek_nextn.py in the released wheels -> (releases, which fixes it needs)
KNOWN_ORIGINALS: dict[str, tuple[str, str]] = {
    "6ad168dac3b99c2e9bc9de16ea132de7902d99f22650cf20e4cbc79462411ef4": ("0.5.8.post1", "eh-proj+excludes"),
    "b325a93198e758ee8ab4a26b37ff0039c0042aa0e13c0f3472711dd98c2e0d66": ("0.5.9", "eh-proj+excludes"),
    "3f06174ad69618cfcd5a25a250ee79599e1116d323ddb0d33af536d13eea30c3": ("0.5.10, 0.5.10.post1", "eh-proj+excludes"),
    "4226a99c2e2edc74ebd9e50f49aed5e9e15e68d66379d42186303a0efd5a541c": ("0.5.11", "excludes"),
    "0106f4cd8672f1c83176031a826bd2054c686cada80e6be6a955bf02e0633cc6": ("0.5.12, 0.5.12.post1", "excludes"),
    "11118f025b4896294ab40f3fe4068e333dc2a07d3a917bb137bf917df838fa3f": ("0.5.13, 0.5.13.post1", "excludes"),
    "fb5c633508d92f4c20ca33f4f791c7629978576c4bb13b0b5a2e6139fbdddfc4": ("0.5.14", "excludes"),
    "201a9c03eba8d3611cdbf0f5747a86ea60910530bc2e299531aca9b27d7fc4a6": ("0.5.15", "excludes"),
    "3a47caa958aa3cbd7a419900ced6fbe631c802f1c4fd99c8223956358f8d0474": ("0.5.15.post1", "excludes"),
}
FIXED_FROM = (0, 5, 16)

_EH_PROJ_LINE = "        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)\n"
_EH_PROJ_PATCHED = f"""        {MARK}: a Quark-aware eh_proj, so an FP4-packed one loads (as SGLang 0.5.11)
        if quant_config is not None and quant_config.get_name() == "quark":
            from sglang.srt.layers.linear import ReplicatedLinear

            class _EhProj(ReplicatedLinear):
                def forward(self, x):
                    return super().forward(x)[0]

            self.eh_proj = _EhProj(
                2 * config.hidden_size,
                config.hidden_size,
                bias=False,
                quant_config=quant_config,
                prefix=add_prefix("eh_proj", prefix),
            )
        else:
            self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
"""
_MODEL_CALL = re.compile(
    r'(        self\.model = DeepseekModelNextN\(\n            config, (nextn_quant_config|quant_config), prefix=add_prefix\("model", prefix\)\n        \)\n)'
)
_REMAP_HELPER = f"""

{MARK}: exclude entries under model.layers.N. also name the draft's own modules (as SGLang 0.5.16)
def _glm5conv_remap_mtp_excludes(quant_config, num_hidden_layers):
    if quant_config is None or quant_config.get_name() != "quark":
        return quant_config
    import copy

    layer = f"model.layers.{{num_hidden_layers}}."
    entries = list(quant_config.exclude_layers)
    mtp = [e for e in entries if e.startswith(layer)]
    if not mtp:
        return quant_config
    names = list(entries)
    for entry in mtp:
        rest = entry[len(layer):]
        top = rest.split(".")[0] in ("eh_proj", "enorm", "hnorm") or rest.startswith("shared_head.")
        names.append(("model." if top else "model.decoder.") + rest)
    fused = {{
        "self_attn.fused_qkv_a_proj_with_mqa": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        "mlp.shared_experts.gate_up_proj": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
    }}
    for name, parts in fused.items():
        if all(layer + part in mtp for part in parts):
            names.append("model.decoder." + name)
    if any(".mlp.experts." in e for e in mtp):
        names.append("model.decoder.mlp.experts")
    quant_config = copy.copy(quant_config)
    quant_config.exclude_layers = list(dict.fromkeys(names))
    return quant_config
"""


def patch_text(original: str, fixes: str) -> str:
    """The patched module source (pure: tests run it on the released files)."""
    text = original
    if "eh-proj" in fixes:
        if text.count(_EH_PROJ_LINE) != 1:
            raise UsageError("deepseek_nextn.py: the eh_proj line to patch was not found exactly once")
        text = text.replace(_EH_PROJ_LINE, _EH_PROJ_PATCHED)
    matches = list(_MODEL_CALL.finditer(text))
    if len(matches) != 1:
        raise UsageError("deepseek_nextn.py: the draft model construction to patch was not found exactly once")
    call, var = matches[0].group(1), matches[0].group(2)
    remap = f"        {MARK}\n        {var} = _glm5conv_remap_mtp_excludes({var}, config.num_hidden_layers)\n"
    text = text.replace(call, remap + call)
    return text + _REMAP_HELPER


def sha256_text(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:3])


@dataclass
class PatchStatus:
    package: Path  # the sglang package folder
    version: str | None
    state: str  # "not-needed", "unpatched", "patched", "unrecognised"
    detail: str

    @property
    def target(self) -> Path:
        return self.package / TARGET

    @property
    def backup(self) -> Path:
        return self.package / (str(TARGET) + BACKUP_SUFFIX)

    @property
    def needs_patch(self) -> bool:
        return self.state == "unpatched"

    def to_json(self) -> dict[str, object]:
        return {"package": str(self.package), "version": self.version, "state": self.state, "detail": self.detail}


def _metadata_version(package: Path) -> str | None:
    """The version from the dist-info beside the package (works for unpacked wheels too)."""
    for meta in sorted(package.parent.glob("sglang-*.dist-info/METADATA")):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def find_sglang(package: Path | None = None) -> tuple[Path, str | None]:
    """The installed sglang package folder and version, without importing sglang (slow, GPU-bound)."""
    if package is None:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(
                "SGLang is not installed in this Python environment (pip install sglang, or use its ROCm image)"
            )
        package = Path(next(iter(spec.submodule_search_locations)))
    elif (package / "sglang").is_dir():
        package = package / "sglang"
    if not (package / TARGET).is_file():
        raise UsageError(f"{package}: not an SGLang package (no {TARGET})")
    return package, _metadata_version(package)


def status(package: Path | None = None) -> PatchStatus:
    package, version = find_sglang(package)
    target = package / TARGET
    current = sha256_text(target.read_bytes())
    if version is not None and version_tuple(version) >= FIXED_FROM:
        return PatchStatus(package, version, "not-needed", f"SGLang {version} has both MTP fixes (0.5.16+)")
    if current in KNOWN_ORIGINALS:
        releases, fixes = KNOWN_ORIGINALS[current]
        return PatchStatus(
            package, version, "unpatched", f"SGLang {releases}: needs the {fixes.replace('+', ' and ')} fix(es)"
        )
    backup = package / (str(TARGET) + BACKUP_SUFFIX)
    if backup.is_file():
        original = backup.read_bytes()
        known = KNOWN_ORIGINALS.get(sha256_text(original))
        if known and target.read_bytes() == patch_text(original.decode(), known[1]).encode():
            return PatchStatus(package, version, "patched", f"SGLang {known[0]}: patched by glm5conv ({known[1]})")
    return PatchStatus(
        package, version, "unrecognised", f"{target}: sha256 {current[:12]}... is not that of a release glm5conv knows"
    )


def _drop_bytecode(target: Path) -> None:
    for pyc in (target.parent / "__pycache__").glob(target.stem + ".*.pyc"):
        pyc.unlink()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".glm5conv-tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
    os.replace(tmp, path)


def apply(package: Path | None = None) -> PatchStatus:
    state = status(package)
    if state.state in ("patched", "not-needed"):
        return state
    if state.state == "unrecognised":
        raise UsageError(f"{state.detail}; refusing to patch it")
    original = state.target.read_bytes()
    fixes = KNOWN_ORIGINALS[sha256_text(original)][1]
    patched = patch_text(original.decode(), fixes).encode()
    compile(patched, str(state.target), "exec")  # never leave a file that does not compile
    _write(state.backup, original)
    _write(state.target, patched)
    _drop_bytecode(state.target)
    return status(state.package)


def revert(package: Path | None = None) -> PatchStatus:
    state = status(package)
    if state.state != "patched":
        if state.state == "unrecognised":
            raise UsageError(f"{state.detail}; refusing to touch it")
        return state
    _write(state.target, state.backup.read_bytes())
    state.backup.unlink()
    _drop_bytecode(state.target)
    return status(state.package)
