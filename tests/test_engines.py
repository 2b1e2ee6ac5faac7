"""The engine rules reproduce what the released engines do (FACTS.md §3, cases a-f)."""

from __future__ import annotations

import pytest

from glm5conv.architecture import ModelLayout
from glm5conv.engines import (
    DISABLE_FUSION_FLAG,
    ENGINES,
    draft_exclude_list,
    engine,
    evaluate,
    exclude_names,
    whole_layer_unquantized,
)
from glm5conv.mtp import mtp_storage

# A tiny GLM-5-style MTP layer (layer 2) with 256 routed experts declared, so that the shared
# expert fusion rules apply as they would on the real model; two experts stand for all.
GLM = ModelLayout("GlmMoeDsaForCausalLM", "glm5", 64, 2, 1, 256, 1, 32)
MODULES = {
    "eh_proj": (64, 128),
    "self_attn.q_a_proj": (32, 64),
    "self_attn.kv_a_proj_with_mqa": (48, 64),
    "self_attn.q_b_proj": (128, 32),
    "self_attn.kv_b_proj": (128, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate": (256, 64),
    "mlp.shared_experts.gate_proj": (32, 64),
    "mlp.shared_experts.up_proj": (32, 64),
    "mlp.shared_experts.down_proj": (64, 32),
    "mlp.experts.0.gate_proj": (32, 64),
    "mlp.experts.0.up_proj": (32, 64),
    "mlp.experts.0.down_proj": (64, 32),
    "mlp.experts.1.gate_proj": (32, 64),
    "mlp.experts.1.up_proj": (32, 64),
    "mlp.experts.1.down_proj": (64, 32),
}
ROUTER = ("model.layers.2.mlp.gate",)


def storage(fp4, layer: int = 2, modules: dict = MODULES):
    tensors = {}
    for module, (out, inp) in modules.items():
        name = f"model.layers.{layer}.{module}"
        if fp4(module):
            tensors[name + ".weight"] = ("U8", (out, inp // 2))
            tensors[name + ".weight_scale"] = ("U8", (out, inp // 32))
        else:
            tensors[name + ".weight"] = ("BF16", (out, inp))
    return mtp_storage(tensors, f"model.layers.{layer}.")


def quantized_except(*float_modules: str):
    return lambda m: m != "mlp.gate" and not any(m.startswith(f) for f in float_modules)


CASES = {
    "a": (quantized_except(), []),
    "b": (quantized_except("eh_proj"), ["model.layers.2.eh_proj"]),
    "c": (quantized_except("eh_proj"), ["model.layers.2.eh_proj", "model.eh_proj"]),
    "d": (lambda m: False, [f"model.layers.2.{m}" for m in MODULES]),
    "e": (lambda m: False, ["model.layers.2"]),
    "f": (quantized_except("mlp.shared_experts"), [f"model.layers.2.{m}" for m in MODULES if "shared" in m]),
}
# FACTS.md §3: 0.5.10, 0.5.11, 0.5.15, 0.5.16, 0.5.23, vLLM 0.33 (0.5.11-0.5.15 share one profile)
EXPECTED = {
    "a": ["fails", "ok", "ok", "ok", "ok", "fails"],
    "b": ["ok", "fails", "fails", "ok", "ok", "ok"],
    "c": ["ok", "ok", "ok", "ok", "ok", "ok"],
    "d": ["fails", "fails", "fails", "ok", "ok", "ok"],
    "e": ["fails", "ok", "ok", "fails", "fails", "fails"],
    "f": ["fails", "fails", "fails", "ok", "fails", "fails"],
}
COLUMNS = ["sglang-0.5.10", "sglang-0.5.11", "sglang-0.5.11", "sglang-0.5.16", "sglang-0.5.23", "vllm-0.33"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_facts_table(case: str) -> None:
    fp4, exclude = CASES[case]
    layer = storage(fp4)
    got = []
    for key in COLUMNS:
        verdict = evaluate(engine(key), GLM, tuple(exclude) + ROUTER, layer)
        got.append("ok" if verdict.status == "loads" else "fails")
    assert got == EXPECTED[case]


def test_case_f_loads_on_0523_with_the_fusion_flag() -> None:
    fp4, exclude = CASES["f"]
    verdict = evaluate(engine("sglang-0.5.23"), GLM, tuple(exclude) + ROUTER, storage(fp4))
    assert verdict.status == "loads-with-flags" and verdict.flags == [DISABLE_FUSION_FLAG]
    flagged = evaluate(
        engine("sglang-0.5.23"), GLM, tuple(exclude) + ROUTER, storage(fp4), disable_shared_experts_fusion=True
    )
    assert flagged.status == "loads"
    # on 0.5.11 the flag is not enough: the shared expert's draft names are not excluded either
    assert evaluate(engine("sglang-0.5.11"), GLM, tuple(exclude) + ROUTER, storage(fp4)).status == "fails"


def test_fusion_needs_256_experts() -> None:
    fp4, exclude = CASES["f"]
    small = ModelLayout("GlmMoeDsaForCausalLM", "glm5", 64, 2, 1, 8, 1, 32)
    assert evaluate(engine("sglang-0.5.23"), small, tuple(exclude) + ROUTER, storage(fp4)).status == "loads"


def test_plain_linear_message_carries_the_real_error_text() -> None:
    verdict = evaluate(engine("sglang-0.5.10"), GLM, ROUTER, storage(quantized_except()))
    text = " ".join(p.message for p in verdict.problems)
    assert "Attempted to load weight (torch.Size([64, 64])) into parameter (torch.Size([64, 128]))" in text
    vllm = evaluate(engine("vllm-0.33"), GLM, ROUTER, storage(quantized_except()))
    assert "eh_proj.weight_scale (KeyError)" in " ".join(p.message for p in vllm.problems)


def test_glm_remap_only_from_0516() -> None:
    exclude = ("model.layers.2.eh_proj", "model.layers.2.mlp.experts.0.gate_proj")
    assert "model.eh_proj" not in draft_exclude_list(engine("sglang-0.5.11"), GLM, exclude)
    mapped = draft_exclude_list(engine("sglang-0.5.16"), GLM, exclude)
    assert {"model.eh_proj", "model.decoder.mlp.experts.0.gate_proj", "model.decoder.mlp.experts"} <= set(mapped)


def test_glm_layer_61_entries_reach_the_draft_before_0516() -> None:
    """SGLang's DeepSeek substring map (model.layers.61 -> model.decoder) hits GLM's main layer 61."""
    real = ModelLayout("GlmMoeDsaForCausalLM", "glm5", 6144, 78, 1, 256, 1, 2048)
    exclude = ("model.layers.61.self_attn.o_proj",)
    assert "model.decoder.self_attn.o_proj" in draft_exclude_list(engine("sglang-0.5.11"), real, exclude)
    assert "model.decoder.self_attn.o_proj" not in draft_exclude_list(engine("sglang-0.5.16"), real, exclude)


def test_deepseek_v3_layer_61() -> None:
    layout = ModelLayout("DeepseekV3ForCausalLM", "deepseek_v3", 64, 61, 1, 256, 1, 32)
    bf16_layer = storage(lambda m: False, layer=61)
    # the bare layer entry is mapped to model.decoder and turns quantization off in every >= 0.5.11
    for key in ("sglang-0.5.11", "sglang-0.5.16", "sglang-0.5.23"):
        assert whole_layer_unquantized(engine(key), layout, ("model.layers.61",))
        assert evaluate(engine(key), layout, ("model.layers.61",), bf16_layer).status == "loads"
    # checkpoint names are mapped onto the decoder's, so per-module entries work for the decoder
    experts_fp4 = storage(lambda m: m.startswith("mlp.experts."), layer=61)
    per_module = tuple(f"model.layers.61.{m}" for m in MODULES if not m.startswith("mlp.experts.")) + ("model.eh_proj",)
    verdict = evaluate(engine("sglang-0.5.11"), layout, per_module, experts_fp4)
    assert verdict.status == "loads-with-flags" and verdict.flags == [DISABLE_FUSION_FLAG]  # bf16 shared expert
    # ... but not for the fused MoE, whose name has no per-expert entry before 0.5.23
    all_names = tuple(f"model.layers.61.{m}" for m in MODULES) + ("model.eh_proj",)
    assert evaluate(engine("sglang-0.5.11"), layout, all_names, bf16_layer).status == "fails"


def test_exclude_names_cover_every_engine() -> None:
    names = exclude_names(GLM, "self_attn.q_a_proj")
    assert names == [
        "model.layers.2.self_attn.q_a_proj",
        "model.decoder.self_attn.q_a_proj",
        "model.decoder.self_attn.fused_qkv_a_proj_with_mqa",
    ]
    assert exclude_names(GLM, "eh_proj") == ["model.layers.2.eh_proj", "model.eh_proj"]
    assert "model.decoder.mlp.experts" in exclude_names(GLM, "mlp.experts.3.down_proj")


def test_converted_bf16_layer_loads_everywhere() -> None:
    """Every float module listed under every engine's names: all profiles load (the converter's goal)."""
    layer = storage(lambda m: m.startswith("mlp.experts."))
    exclude = [n for m in MODULES if not m.startswith("mlp.experts.") for n in exclude_names(GLM, m)]
    small = ModelLayout("GlmMoeDsaForCausalLM", "glm5", 64, 2, 1, 8, 1, 32)
    for profile in ENGINES:
        assert evaluate(profile, small, tuple(exclude), layer).status == "loads", profile.key
