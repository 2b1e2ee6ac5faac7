"""Build the bundled tiny GLM-5-MXFP4-style checkpoint with AMD Quark itself.

1. A tiny GlmMoeDsaForCausalLM from transformers (2 decoder layers: dense, MoE) plus an MTP
   layer with GLM-5's tensor names (layer 2: enorm, hnorm, eh_proj, shared_head.norm and a
   full MoE decoder layer with the DSA indexer), saved as a bf16 checkpoint in 3 shards the
   way transformers names and lays them out.
2. Quantized with amd-quark's file-to-file mode (``quantize_model_per_safetensor``), the path
   the real amd/GLM-5-MXFP4 most likely took (FACTS.md §2), with the GLM-5-MXFP4 recipe:
   MXFP4 (OCP, E8M0 scales, round-half-even, "even" shared exponent) for the routed experts
   and eh_proj; every other Linear listed by name in ``exclude``.
3. Quark writes a weight's scale into the weight's shard. To exercise partner tensors that
   live in another shard (as large exports do), ``eh_proj.weight_scale`` is then moved to the
   last shard, keeping Quark's conventions: shards without metadata, index with indent 4,
   unsorted keys and ``total_size`` = sum of shard file sizes.

Usage: python scripts/make_tiny_checkpoint.py [--out glm5conv/bundled/tiny-glm5-mxfp4]
       [--bf16-out DIR] (also keep the unquantized bf16 source)
       python scripts/make_tiny_checkpoint.py --from-bf16 DIR --out glm5conv/bundled/tiny-glm5-trained
       (quantize an existing bf16 checkpoint, e.g. scripts/train_tiny_glm5.py's, with the same recipe;
       its eh_proj scale stays next to the weight, as Quark writes it. A single-file source is first
       split at layer boundaries into --shards shards of about equal size, so that no bundled file
       grows past a few MB; Quark keeps one output shard per input shard)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MTP_LAYER = 2
TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_topk=8,
    index_head_dim=32,
    index_n_heads=2,
    first_k_dense_replace=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    max_position_embeddings=4096,
    bos_token_id=0,
    eos_token_id=1,
)


def tiny_config(num_hidden_layers: int, **overrides):
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(num_hidden_layers=num_hidden_layers, **(TINY_CONFIG | overrides))


def bf16_state(seed: int, **overrides) -> dict[str, torch.Tensor]:
    """Weights of layers 0..2 (layer 2 becomes the MTP layer) plus the MTP-specific tensors."""
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(tiny_config(MTP_LAYER + 1, **overrides))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # transformers splits fused experts back into per-expert names
        state: dict[str, torch.Tensor] = {}
        for path in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = (TINY_CONFIG | overrides)["hidden_size"]
    for name in list(state):
        tensor = state[name]
        if name.endswith("e_score_correction_bias"):
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.01).float()
        elif name.endswith("norm.weight"):
            state[name] = (1 + 0.1 * torch.randn(tensor.shape, generator=generator)).to(torch.bfloat16)
        elif tensor.is_floating_point():
            state[name] = tensor.to(torch.bfloat16)
    prefix = f"model.layers.{MTP_LAYER}."
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        state[f"{prefix}{norm}.weight"] = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(torch.bfloat16)
    state[f"{prefix}eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=generator) * 0.05).to(torch.bfloat16)
    return state


def shard_of(name: str) -> int:
    """3 shards: embeddings + layer 0 | layer 1, head, MTP attention/eh_proj | MTP experts."""
    prefix = f"model.layers.{MTP_LAYER}."
    if name.startswith(prefix) and ".mlp." in name and ".mlp.gate." not in name:
        return 3
    if name.startswith("model.embed_tokens") or name.startswith("model.layers.0."):
        return 1
    return 2


def write_bf16_checkpoint(state: dict[str, torch.Tensor], out: Path, **overrides) -> None:
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[int, dict[str, torch.Tensor]] = {1: {}, 2: {}, 3: {}}
    for name in sorted(state):
        groups[shard_of(name)][name] = state[name].contiguous()
    weight_map: dict[str, str] = {}
    total = 0
    for number, tensors in groups.items():
        filename = f"model-{number:05d}-of-00003.safetensors"
        save_file(tensors, out / filename, metadata={"format": "pt"})
        weight_map.update({k: filename for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = tiny_config(MTP_LAYER, **overrides).to_dict()
    config["architectures"] = ["GlmMoeDsaForCausalLM"]
    config["num_nextn_predict_layers"] = 1
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _layer_key(name: str) -> float:
    """Storage order: embeddings, decoder layers by index (the MTP layer is the last), then norm and head."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return int(parts[2])
    return -1 if "embed_tokens" in name else math.inf


def split_into_shards(src: Path, state: dict[str, torch.Tensor], out: Path, count: int) -> None:
    """Re-save a single-file bf16 checkpoint as ``count`` shards cut at layer boundaries, with an index."""
    groups: dict[int, list[str]] = {}
    for name in state:
        groups.setdefault(_layer_key(name), []).append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: list[list[str]] = [[]]
    filled = 0
    for key in sorted(groups):
        size = sum(state[n].numel() * state[n].element_size() for n in groups[key])
        if shards[-1] and filled + size / 2 > total * len(shards) / count and len(shards) < count:
            shards.append([])
        shards[-1].extend(sorted(groups[key]))
        filled += size
    out.mkdir(parents=True)
    weight_map = {}
    for number, names in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for extra in src.iterdir():
        if extra.is_file() and not extra.name.startswith("model.safetensors"):
            shutil.copy2(extra, out / extra.name)


def glm5_mxfp4_exclude(state: dict[str, torch.Tensor]) -> list[str]:
    """Every Linear except routed experts and eh_proj, by module name, as Quark writes it."""
    exclude = []
    for name in sorted(state):
        module, _, param = name.rpartition(".")
        if param != "weight" or state[name].ndim != 2 or module.endswith("norm") or "embed" in module:
            continue
        if ".mlp.experts." in module or module.endswith(".eh_proj"):
            continue
        exclude.append(module)
    return exclude


def quantize_with_quark(src: Path, out: Path, exclude: list[str]) -> None:
    from quark.torch.quantization.config.config import OCP_MXFP4Spec, QConfig, QLayerConfig
    from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor

    weight = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()
    activations = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=True).to_quantization_spec()
    config = QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=activations), exclude=exclude)
    quantize_model_per_safetensor(str(src), config, str(out), device="cpu")


def move_scale_to_last_shard(out: Path) -> None:
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = index["weight_map"]
    scale = f"model.layers.{MTP_LAYER}.eh_proj.weight_scale"
    source, target = weight_map[scale], "model-00003-of-00003.safetensors"
    for filename in (source, target):
        with safe_open(out / filename, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if filename == source:
            moved = tensors.pop(scale)
        else:
            tensors[scale] = moved
        save_file(tensors, out / filename)  # no metadata, like Quark's writer
    weight_map[scale] = target
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index, ensure_ascii=False, indent=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("glm5conv/bundled/tiny-glm5-mxfp4"))
    parser.add_argument("--bf16-out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-bf16", type=Path, default=None)
    parser.add_argument("--shards", type=int, default=3, help="--from-bf16 of a single file: shards to split it into")
    args = parser.parse_args()

    if args.from_bf16 is not None:
        state = {}
        for path in sorted(args.from_bf16.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        if args.out.exists():
            shutil.rmtree(args.out)
        with tempfile.TemporaryDirectory() as tmp:
            source = args.from_bf16
            if (source / "model.safetensors").exists() and args.shards > 1:
                source = Path(tmp) / "sharded"
                split_into_shards(args.from_bf16, state, source, args.shards)
            quantize_with_quark(source, args.out, glm5_mxfp4_exclude(state))
        size = sum(p.stat().st_size for p in args.out.iterdir())
        print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
        return
    state = bf16_state(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        bf16_dir = args.bf16_out or Path(tmp) / "bf16"
        write_bf16_checkpoint(state, bf16_dir)
        if args.out.exists():
            shutil.rmtree(args.out)
        quantize_with_quark(bf16_dir, args.out, glm5_mxfp4_exclude(state))
    move_scale_to_last_shard(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
