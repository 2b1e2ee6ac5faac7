"""How each serving engine builds and loads the MTP (draft) layer, as pure rules.

Read from the released wheels (``pip download --no-deps sglang==V`` / ``vllm==0.33.0``) and
summarised in FACTS.md §3; docs/engines.md says which source lines each rule comes from.
Given what the checkpoint stores for the MTP layer and its Quark ``exclude`` list, every rule
answers: which parameter does the engine allocate for each draft module, and does the stored
tensor fit it. Nothing here reads files, so the rules are tested on plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from glm5conv.architecture import MTP_SPECIFIC_MODULES, ModelLayout
from glm5conv.mtp import MXFP4, ROUTED_EXPERT_MARK, ModuleStorage
from glm5conv.quark_config import REGEX_PREFIX, entry_matches

DISABLE_FUSION_FLAG = "--disable-shared-experts-fusion"
SHARED_EXPERT_PREFIX = "mlp.shared_experts."


# The draft's fused Linears and their parts (SGLang names; vLLM calls the first fused_qkv_a_proj).
SGLANG_FUSED_MODULES = {
    "self_attn.fused_qkv_a_proj_with_mqa": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    "mlp.shared_experts.gate_up_proj": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
}


@dataclass(frozen=True)
class EngineProfile:
    """One engine release's MTP loading behaviour, reduced to the switches that matter."""

    key: str
    label: str
    engine: str  # "sglang" or "vllm"
    eh_proj_quark_aware: bool  # ReplicatedLinear honouring quant_config (PR #23219) vs nn.Linear
    glm_remaps_mtp_excludes: bool  # GlmMoeDsaForCausalLMNextN (PR #30265) for GLM checkpoints
    fused_by_parts: bool  # fused modules checked by their parts' names (else by the fused name)
    experts_by_children: bool  # an excluded expert child excludes the whole FusedMoE
    shared_fusion_architectures: tuple[str, ...]  # draft classes for which shared-expert fusion is on
    shared_fusion_expert_counts: tuple[int, ...]
    skips_unknown_tensors: bool  # SGLang logs and skips; vLLM raises KeyError
    patched: bool = False  # `glm5conv sglang-patch --apply`: Quark-aware eh_proj + exclude remap (fused names too)

    def draft_class(self, layout: ModelLayout) -> str:
        if self.engine == "vllm":
            return "DeepSeekMTP"
        if layout.family == "glm5" and self.glm_remaps_mtp_excludes:
            return "GlmMoeDsaForCausalLMNextN"
        return "DeepseekV3ForCausalLMNextN"

    def decoder_prefix(self, layout: ModelLayout) -> str:
        return layout.mtp_prefix() if self.engine == "vllm" else "model.decoder."

    def fused_modules(self) -> dict[str, tuple[str, ...]]:
        fused = dict(SGLANG_FUSED_MODULES)
        if self.engine == "vllm":
            fused["self_attn.fused_qkv_a_proj"] = fused.pop("self_attn.fused_qkv_a_proj_with_mqa")
        return fused | {"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

    def never_quantized(self) -> dict[str, tuple[str, ...]]:
        """Modules built without quant_config whatever the exclude list says."""
        never = {"mlp.gate": ("mlp.gate",)}
        if self.engine == "vllm":
            never["self_attn.indexer.wk_weights_proj"] = ("self_attn.indexer.wk", "self_attn.indexer.weights_proj")
        else:
            never["self_attn.indexer.weights_proj"] = ("self_attn.indexer.weights_proj",)
        return never


ENGINES: tuple[EngineProfile, ...] = (
    EngineProfile(
        key="sglang-0.5.10",
        label="SGLang <= 0.5.10",
        engine="sglang",
        eh_proj_quark_aware=False,
        glm_remaps_mtp_excludes=False,
        fused_by_parts=False,
        experts_by_children=False,
        shared_fusion_architectures=("DeepseekV3ForCausalLMNextN",),
        shared_fusion_expert_counts=(256,),
        skips_unknown_tensors=True,
    ),
    EngineProfile(
        key="sglang-0.5.11",
        label="SGLang 0.5.11 - 0.5.15",
        engine="sglang",
        eh_proj_quark_aware=True,
        glm_remaps_mtp_excludes=False,
        fused_by_parts=True,
        experts_by_children=False,
        shared_fusion_architectures=("DeepseekV3ForCausalLMNextN",),
        shared_fusion_expert_counts=(256,),
        skips_unknown_tensors=True,
    ),
    EngineProfile(
        key="sglang-0.5.16",
        label="SGLang 0.5.16",
        engine="sglang",
        eh_proj_quark_aware=True,
        glm_remaps_mtp_excludes=True,
        fused_by_parts=True,
        experts_by_children=False,
        shared_fusion_architectures=("DeepseekV3ForCausalLMNextN",),
        shared_fusion_expert_counts=(256, 384),
        skips_unknown_tensors=True,
    ),
    EngineProfile(
        key="sglang-0.5.23",
        label="SGLang 0.5.23",
        engine="sglang",
        eh_proj_quark_aware=True,
        glm_remaps_mtp_excludes=True,
        fused_by_parts=True,
        experts_by_children=True,
        shared_fusion_architectures=("DeepseekV3ForCausalLMNextN", "GlmMoeDsaForCausalLMNextN"),
        shared_fusion_expert_counts=(256, 384),
        skips_unknown_tensors=True,
    ),
    EngineProfile(
        key="vllm-0.33",
        label="vLLM 0.33",
        engine="vllm",
        eh_proj_quark_aware=False,
        glm_remaps_mtp_excludes=False,
        fused_by_parts=True,
        experts_by_children=True,
        shared_fusion_architectures=(),
        shared_fusion_expert_counts=(),
        skips_unknown_tensors=False,
    ),
)
ENGINE_KEYS = tuple(e.key for e in ENGINES)
# The releases glm5conv sglang-patch rewrites, and what they behave like once patched.
PATCHABLE_KEYS = ("sglang-0.5.10", "sglang-0.5.11")
QUARK_AWARE_ENGINE_KEYS = tuple(e.key for e in ENGINES if e.eh_proj_quark_aware)


def engine(key: str) -> EngineProfile:
    for profile in ENGINES:
        if profile.key == key:
            return profile
    if key.endswith("-patched") and key.removesuffix("-patched") in PATCHABLE_KEYS:
        return patched(engine(key.removesuffix("-patched")))
    raise KeyError(key)


def patched(profile: EngineProfile) -> EngineProfile:
    """The profile of an SGLang release after ``glm5conv sglang-patch --apply``."""
    return replace(
        profile,
        key=profile.key + "-patched",
        label=profile.label + " (glm5conv-patched)",
        eh_proj_quark_aware=True,
        patched=True,
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def sglang_profile(version: str, is_patched: bool = False) -> tuple[EngineProfile, str]:
    """The rules for an installed SGLang version, and a note when that release was not read.

    Versions between the releases read are taken to behave like the older one; later ones like
    the newest read.
    """
    v = _version_tuple(version)
    if v < (0, 5, 11):
        key, read = "sglang-0.5.10", {(0, 5, 9), (0, 5, 10)}
    elif v < (0, 5, 16):
        key, read = "sglang-0.5.11", {(0, 5, 11), (0, 5, 12), (0, 5, 13), (0, 5, 14), (0, 5, 15)}
    elif v < (0, 5, 17):
        key, read = "sglang-0.5.16", {(0, 5, 16)}
    else:
        key, read = "sglang-0.5.23", {(0, 5, 23)}
    profile = engine(key)
    if is_patched and key in PATCHABLE_KEYS:
        profile = patched(profile)
    note = "" if v in read else f"SGLang {version} was not read by glm5conv; assuming it behaves like {profile.label}"
    return profile, note


# SGLang's DeepseekV3ForCausalLMNextN.hf_to_sglang_mapper (all versions read): a substring map
# written for DeepSeek's MTP layer 61. It is applied to the draft's exclude list, so for a GLM
# checkpoint it maps the *main* layer 61's entries onto the draft's decoder names.
_DEEPSEEK_SUBSTRING_MAP = ("model.layers.61", "model.decoder")


def _remap_mtp_entries(layout: ModelLayout, names: tuple[str, ...], fused_names: bool) -> tuple[str, ...]:
    """Add, for each entry under ``model.layers.N.``, the draft's own name (as PR #30265 does)."""
    prefix = layout.mtp_prefix()
    mtp_entries = [e for e in names if e.startswith(prefix)]
    out = list(names)
    for entry in mtp_entries:
        rest = entry[len(prefix) :]
        top = any(part in rest for part in MTP_SPECIFIC_MODULES)
        out.append(("model." if top else "model.decoder.") + rest)
    if fused_names:  # glm5conv's patch also names fused modules whose parts are all excluded
        for unit, parts in SGLANG_FUSED_MODULES.items():
            if all(prefix + part in mtp_entries for part in parts):
                out.append("model.decoder." + unit)
    if any(f".{ROUTED_EXPERT_MARK}" in e for e in mtp_entries):
        out.append("model.decoder.mlp.experts")
    return tuple(dict.fromkeys(out))


def draft_exclude_list(profile: EngineProfile, layout: ModelLayout, exclude: tuple[str, ...]) -> tuple[str, ...]:
    """The exclude list as the engine holds it when it builds the draft model."""
    if profile.engine == "vllm":
        return exclude
    names = exclude
    if profile.draft_class(layout) == "DeepseekV3ForCausalLMNextN":
        old, new = _DEEPSEEK_SUBSTRING_MAP
        names = tuple(e.replace(old, new, 1) for e in names)
    if profile.patched or profile.draft_class(layout) == "GlmMoeDsaForCausalLMNextN":
        names = _remap_mtp_entries(layout, names, fused_names=profile.patched)
    return names


def whole_layer_unquantized(profile: EngineProfile, layout: ModelLayout, exclude: tuple[str, ...]) -> bool:
    """SGLang >= 0.5.11 drops quant_config for the whole draft when the bare layer is excluded.

    GlmMoeDsaForCausalLMNextN (0.5.16+) overrides that check away for GLM checkpoints.
    """
    if profile.engine != "sglang" or not profile.eh_proj_quark_aware:
        return False
    if profile.draft_class(layout) != "DeepseekV3ForCausalLMNextN":
        return False
    old, new = _DEEPSEEK_SUBSTRING_MAP
    layer_name = f"model.layers.{layout.mtp_layer}".replace(old, new, 1)
    return any(entry_matches(e, layer_name) for e in draft_exclude_list(profile, layout, exclude))


@dataclass(frozen=True)
class Problem:
    module: str
    message: str
    fix: str = ""
    needs_flag: str = ""  # set when an engine flag, not a conversion, avoids the problem


@dataclass
class EngineVerdict:
    engine: EngineProfile
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if any(not p.needs_flag for p in self.problems):
            return "fails"
        return "loads-with-flags" if self.problems else "loads"

    @property
    def flags(self) -> list[str]:
        return sorted({p.needs_flag for p in self.problems if p.needs_flag})

    def to_json(self) -> dict[str, object]:
        return {
            "engine": self.engine.key,
            "label": self.engine.label,
            "status": self.status,
            "flags": self.flags,
            "problems": [{"module": p.module, "message": p.message, "fix": p.fix} for p in self.problems],
            "notes": self.notes,
        }


def _quantized_form(out: int, inp: int) -> str:
    return f"MXFP4 U8 [{out}, {inp // 2}] + weight_scale U8 [{out}, {inp // 32}]"


def _float_form(out: int, inp: int) -> str:
    return f"BF16 [{out}, {inp}]"


def _excluded(names: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(entry_matches(e, n) for e in exclude for n in names)


def evaluate(
    profile: EngineProfile,
    layout: ModelLayout,
    exclude: tuple[str, ...],
    storage: Mapping[str, ModuleStorage],
    *,
    quantized_checkpoint: bool = True,
    disable_shared_experts_fusion: bool = False,
) -> EngineVerdict:
    """What ``profile`` does with this MTP layer (``quantized_checkpoint=False``: no quant_config)."""
    verdict = EngineVerdict(profile)
    draft_exclude = draft_exclude_list(profile, layout, exclude)
    no_quant = not quantized_checkpoint or whole_layer_unquantized(profile, layout, exclude)
    if no_quant and quantized_checkpoint:
        verdict.notes.append(f"the whole MTP layer is excluded: {profile.label} builds the draft without quantization")
    prefix = profile.decoder_prefix(layout)
    layer = layout.mtp_prefix()
    fix_convert = "glm5conv convert SRC DST --to bf16"
    fix_excludes = "glm5conv convert SRC DST (completes the exclude list)"

    def built_quantized(draft_names: tuple[str, ...], parts_names: tuple[str, ...]) -> bool | str:
        if no_quant:
            return False
        if not profile.fused_by_parts or not parts_names:
            return not _excluded(draft_names, draft_exclude)
        flags = {_excluded((n,), draft_exclude) for n in parts_names}
        if len(flags) > 1:
            return "mixed"
        return not flags.pop()

    def check(unit: str, parts: tuple[str, ...], quantized: bool) -> None:
        wrong = [storage[p] for p in parts if (storage[p].kind == MXFP4) != quantized]
        if not wrong:
            return
        out, inp = wrong[0].logical_shape
        stored = ", ".join(f"{w.module} as {w.describe()}" for w in wrong)
        if quantized:
            verdict.problems.append(
                Problem(
                    unit,
                    f"{profile.label} builds {prefix}{unit} as MXFP4 (no exclude entry matches its draft "
                    f"name) but the checkpoint stores {stored}",
                    fix_excludes,
                )
            )
        else:
            verdict.problems.append(
                Problem(
                    unit,
                    f"{profile.label} builds {prefix}{unit} unquantized ({_float_form(out, inp)}) but the "
                    f"checkpoint stores {stored}",
                    fix_convert,
                )
            )

    handled: set[str] = set()

    # eh_proj: nn.Linear in old releases and vLLM; Quark-aware ReplicatedLinear from 0.5.11.
    if "eh_proj" in storage:
        handled.add("eh_proj")
        stored = storage["eh_proj"]
        out, inp = stored.logical_shape
        if profile.eh_proj_quark_aware and not no_quant:
            quantized = not _excluded(("model.eh_proj",), draft_exclude)
            if quantized and stored.kind != MXFP4:
                verdict.problems.append(
                    Problem(
                        "eh_proj",
                        f"{profile.label} builds model.eh_proj as {_quantized_form(out, inp)} because "
                        f"'model.eh_proj' is not in exclude; the checkpoint stores {stored.describe()}",
                        fix_excludes,
                    )
                )
            elif not quantized and stored.kind == MXFP4:
                verdict.problems.append(
                    Problem(
                        "eh_proj",
                        f"{profile.label} builds model.eh_proj as {_float_form(out, inp)} because "
                        f"'model.eh_proj' is excluded; the checkpoint stores {stored.describe()}",
                        fix_convert,
                    )
                )
        elif stored.kind == MXFP4:
            missing = (
                ""
                if profile.skips_unknown_tensors
                else f"; and it has no parameter for {layer}eh_proj.weight_scale (KeyError)"
            )
            verdict.problems.append(
                Problem(
                    "eh_proj",
                    f"{profile.label} builds eh_proj as a plain Linear ({_float_form(out, inp)}); the checkpoint stores "
                    f"{stored.describe()}: Attempted to load weight (torch.Size([{stored.shape[0]}, {stored.shape[1]}])) "
                    f"into parameter (torch.Size([{out}, {inp}])){missing}",
                    fix_convert,
                )
            )

    # Modules never built quantized (router, indexer weights_proj).
    for unit, parts in profile.never_quantized().items():
        present = tuple(p for p in parts if p in storage)
        handled.update(present)
        check(unit, present, False)

    # Routed experts: one FusedMoE for all of them.
    experts = tuple(m for m in storage if m.startswith(ROUTED_EXPERT_MARK))
    experts_quantized: bool | None = None
    if experts:
        handled.update(experts)
        kinds = {storage[m].kind for m in experts}
        moe_name = f"{prefix}mlp.experts"
        excluded = _excluded((moe_name,), draft_exclude) or (
            profile.experts_by_children
            and any(not e.startswith(REGEX_PREFIX) and e.startswith(moe_name + ".") for e in draft_exclude)
        )
        experts_quantized = not (no_quant or excluded)
        if len(kinds) > 1:
            verdict.problems.append(Problem("mlp.experts", "routed experts are stored in mixed formats", fix_convert))
        else:
            stored = storage[experts[0]]
            if experts_quantized != (stored.kind == MXFP4):
                built = "MXFP4" if experts_quantized else "bf16"
                fix = fix_excludes if experts_quantized else fix_convert
                verdict.problems.append(
                    Problem(
                        "mlp.experts",
                        f"{profile.label} builds {moe_name} as {built} but the checkpoint stores the "
                        f"routed experts as {stored.describe()}",
                        fix,
                    )
                )

    # Shared experts fused into the routed-expert tensor as an extra slot.
    shared = tuple(m for m in storage if m.startswith(SHARED_EXPERT_PREFIX))
    fusion = (
        bool(shared)
        and experts_quantized is not None
        and not disable_shared_experts_fusion
        and profile.draft_class(layout) in profile.shared_fusion_architectures
        and layout.n_routed_experts in profile.shared_fusion_expert_counts
        and layout.n_shared_experts == 1
    )
    if fusion:
        mismatched = [m for m in shared if (storage[m].kind == MXFP4) != experts_quantized]
        if not mismatched:
            handled.update(shared)
        else:
            # With the flag the shared expert is built on its own: checked below like any module.
            built = "MXFP4" if experts_quantized else "bf16"
            verdict.problems.append(
                Problem(
                    "mlp.shared_experts",
                    f"{profile.label} fuses the shared expert into the {built} routed-expert "
                    f"tensor, but it is stored as {storage[mismatched[0]].describe()}",
                    needs_flag=DISABLE_FUSION_FLAG,
                )
            )

    # Fused and plain linears of the decoder.
    for unit, parts in profile.fused_modules().items():
        present = tuple(p for p in parts if p in storage and p not in handled)
        if not present:
            continue
        handled.update(present)
        kinds = {storage[p].kind for p in present}
        if len(kinds) > 1:
            verdict.problems.append(Problem(unit, f"the parts of {unit} are stored in different formats", fix_convert))
            continue
        quantized = built_quantized((prefix + unit,), tuple(prefix + p for p in present))
        if quantized == "mixed":
            verdict.problems.append(
                Problem(
                    unit,
                    f"{profile.label}: exclude covers only some parts of {prefix}{unit} (Found different "
                    "quantization schemes)",
                    fix_excludes,
                )
            )
            continue
        check(unit, present, bool(quantized))
    for module in storage:
        if module in handled:
            continue
        quantized = built_quantized((prefix + module,), ())
        check(module, (module,), bool(quantized))

    return verdict


def exclude_names(layout: ModelLayout, module: str) -> list[str]:
    """Every name some engine checks to decide that MTP module ``module`` stays unquantized.

    The checkpoint name (Quark, vLLM, SGLang >= 0.5.16 after its remap), the SGLang draft's own
    name (``model.eh_proj`` / ``model.decoder.<module>``) and, for parts of fused modules, the
    fused name SGLang 0.5.10 checks. Entries that match nothing are harmless to every engine.
    """
    layer = layout.mtp_prefix()
    if module.startswith(ROUTED_EXPERT_MARK):  # the draft builds one FusedMoE for all experts
        return [layer + module, layer + "mlp.experts", "model.decoder.mlp.experts"]
    top = module in MTP_SPECIFIC_MODULES
    names = [layer + module, ("model." if top else "model.decoder.") + module]
    for profile in ENGINES:
        for unit, parts in profile.fused_modules().items():
            if module in parts and profile.engine == "sglang" and not profile.fused_by_parts:
                names.append("model.decoder." + unit)
    return list(dict.fromkeys(names))


def whole_layer_exclude_names(layout: ModelLayout) -> list[str]:
    """Names that make SGLang 0.5.11-0.5.15 build the whole draft unquantized."""
    return [f"model.layers.{layout.mtp_layer}"]
