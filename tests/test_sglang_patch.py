"""sglang-patch against the released SGLang wheels (fetched with pip; skipped visibly without network)."""

from __future__ import annotations

import hashlib
import py_compile
from pathlib import Path
from types import SimpleNamespace

import pytest

from glm5conv import sglang_patch
from glm5conv.errors import UsageError
from tests.helpers import run_cli
from tests.sglang_wheels import VERSIONS, QuarkConfig, load_nextn, unpack

pytestmark = pytest.mark.sglang_wheels
PATCHED = ("0.5.10.post1", "0.5.11", "0.5.15.post1")
H = 64


def tree_hash(root: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))).hexdigest()


@pytest.mark.parametrize("version", VERSIONS)
def test_apply_check_revert(tmp_path: Path, version: str, capsys) -> None:
    root = unpack(version, tmp_path)
    target = root / "sglang" / sglang_patch.TARGET
    original = target.read_bytes()
    code, out, _ = run_cli(["sglang-patch", "--check", "--sglang-dir", root, "--json"], capsys)
    state = __import__("json").loads(out)["state"]
    if version not in PATCHED:
        assert state == "not-needed" and code == 0
        assert sglang_patch.apply(root).state == "not-needed" and target.read_bytes() == original
        return
    assert state == "unpatched" and code == 1  # CI can gate on it
    assert sglang_patch.apply(root).state == "patched"
    assert target.read_bytes() != original and sglang_patch.MARK in target.read_text()
    py_compile.compile(str(target), doraise=True)
    assert sglang_patch.apply(root).state == "patched"  # idempotent
    code, _, _ = run_cli(["sglang-patch", "--check", "--sglang-dir", root], capsys)
    assert code == 0
    code, _, _ = run_cli(["sglang-patch", "--revert", "--sglang-dir", root], capsys)
    assert code == 0 and target.read_bytes() == original
    assert not (target.parent / (target.name + sglang_patch.BACKUP_SUFFIX)).exists()


def test_refuses_files_it_does_not_know(tmp_path: Path, capsys) -> None:
    root = unpack("0.5.11", tmp_path)
    target = root / "sglang" / sglang_patch.TARGET
    target.write_text(target.read_text() + "\n# a local edit\n")
    before = target.read_bytes()
    code, _, err = run_cli(["sglang-patch", "--apply", "--sglang-dir", root], capsys)
    assert code == 2 and "is not that of a release glm5conv knows; refusing to patch it" in err
    assert target.read_bytes() == before
    with pytest.raises(UsageError):
        sglang_patch.revert(root)


def glm_config() -> SimpleNamespace:
    return SimpleNamespace(
        hidden_size=H,
        num_hidden_layers=78,
        rms_norm_eps=1e-5,
        vocab_size=256,
        num_nextn_predict_layers=1,
        architectures=["DeepseekV3ForCausalLMNextN"],
        n_routed_experts=256,
        n_shared_experts=1,
    )


FP4_EXCLUDE = ["lm_head", "model.layers.78.self_attn.q_b_proj", "model.layers.78.mlp.gate"]  # eh_proj left FP4
BF16_EXCLUDE = FP4_EXCLUDE + ["model.layers.78.eh_proj", "model.layers.78.mlp.experts.0.gate_proj"]  # GLM-5.2 style


def build_eh_proj(root: Path, exclude: list[str]):
    module, should_ignore = load_nextn(root)
    draft = module.DeepseekV3ForCausalLMNextN(glm_config(), QuarkConfig(exclude, should_ignore))
    return draft.model.eh_proj


@pytest.mark.parametrize("version", PATCHED)
def test_patched_draft_builds_the_checkpoints_eh_proj(tmp_path: Path, version: str) -> None:
    """The real construction code, run with stubs: FP4 eh_proj -> FP4 params; bf16 excluded -> bf16 params."""
    root = unpack(version, tmp_path)
    before_fp4, before_bf16 = build_eh_proj(root, FP4_EXCLUDE), build_eh_proj(root, BF16_EXCLUDE)
    sglang_patch.apply(root)
    fp4, bf16 = build_eh_proj(root, FP4_EXCLUDE), build_eh_proj(root, BF16_EXCLUDE)

    assert tuple(fp4.weight.shape) == (H, H) and str(fp4.weight.dtype) == "torch.uint8"
    assert tuple(fp4.weight_scale.shape) == (H, 2 * H // 32)
    assert tuple(bf16.weight.shape) == (H, 2 * H) and not hasattr(bf16, "weight_scale")
    if version == "0.5.10.post1":  # unpatched: a plain Linear whatever the checkpoint holds
        assert type(before_fp4).__name__ == "Linear" and tuple(before_fp4.weight.shape) == (H, 2 * H)
    else:  # unpatched: 'model.layers.78.eh_proj' never reaches the draft's 'model.eh_proj'
        assert tuple(before_bf16.weight.shape) == (H, H)
        assert tuple(before_fp4.weight.shape) == (H, H)
