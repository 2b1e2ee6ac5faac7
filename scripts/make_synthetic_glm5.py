"""Write a synthetic checkpoint with amd/GLM-5-MXFP4's real structure, for benchmarks and scale tests.

- config.json: GLM-5's real configuration (hidden 6144, 78 layers + MTP layer 78, 256 routed experts)
  with a Quark quantization_config as Quark 0.13's file-to-file writer leaves it: routed experts and
  eh_proj MXFP4, every other Linear listed by name in ``exclude`` (routers included).
- Every tensor of the real model is named in a complete index, packed in model order into exactly
  282 shards named ``model-000NN-of-00282.safetensors`` (the MTP layer starts a fresh shard).
- The MTP layer is written at full size with real shapes and dtypes (eh_proj U8 [6144, 6144] +
  scale [6144, 384]; 256 routed experts MXFP4; attention, indexer, shared expert bf16), about 5.5 GB.
  The other shards are sparse files: real headers and sizes (430 GB in all), zero data, a few MB
  on disk; --full writes random data there too, --sparse makes the MTP shards sparse as well (a
  full-size layout in seconds, for planning and dry runs).
- Random but valid data (scale bytes 100..140, never 255), deterministic for a given --seed.
- Quark's conventions: shards without metadata, index with indent 4 and total_size = shard file sizes.

Usage: python scripts/make_synthetic_glm5.py OUT [--full | --sparse] [--seed 0] [--hf-cache]
  --hf-cache lays the folder out as a Hugging Face cache snapshot (files are symlinks into blobs/
  named by their sha256), as `huggingface-cli download` leaves it; OUT is then the snapshot folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from glm5conv.shard import DTYPE_SIZES, TensorSpec, encode_header

NUM_SHARDS = 282
CHUNK = 64 << 20

CONFIG = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": "glm_moe_dsa",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": [154820, 154827, 154829],
    "pad_token_id": 154820,
    "dtype": "bfloat16",
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "index_head_dim": 128,
    "index_n_heads": 32,
    "index_topk": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "kv_lora_rank": 512,
    "max_position_embeddings": 202752,
    "moe_intermediate_size": 2048,
    "n_group": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 78,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 2048,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "use_cache": True,
    "v_head_dim": 256,
    "vocab_size": 154880,
}
MXFP4_SPEC = {
    "dtype": "fp4",
    "is_dynamic": False,
    "qscheme": "per_group",
    "ch_axis": -1,
    "group_size": 32,
    "symmetric": None,
    "round_method": "half_even",
    "scale_type": "float",
    "scale_format": "e8m0",
    "scale_calculation_mode": "even",
    "mx_element_dtype": None,
    "observer_cls": "PerBlockMXObserver",
}


def layer_tensors(layer: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of one decoder layer, MXFP4 where GLM-5-MXFP4 quantizes."""
    c = CONFIG
    h, heads = c["hidden_size"], c["num_attention_heads"]
    p = f"model.layers.{layer}."
    bf16 = [
        ("input_layernorm.weight", (h,)),
        ("post_attention_layernorm.weight", (h,)),
        ("self_attn.q_a_proj.weight", (c["q_lora_rank"], h)),
        ("self_attn.q_a_layernorm.weight", (c["q_lora_rank"],)),
        ("self_attn.q_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]), c["q_lora_rank"])),
        ("self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], h)),
        ("self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],)),
        ("self_attn.kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
        ("self_attn.o_proj.weight", (h, heads * c["v_head_dim"])),
        ("self_attn.indexer.wq_b.weight", (c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"])),
        ("self_attn.indexer.wk.weight", (c["index_head_dim"], h)),
        ("self_attn.indexer.k_norm.weight", (c["index_head_dim"],)),
        ("self_attn.indexer.k_norm.bias", (c["index_head_dim"],)),
        ("self_attn.indexer.weights_proj.weight", (c["index_n_heads"], h)),
    ]
    out = [(p + n, "BF16", s) for n, s in bf16]
    if layer < c["first_k_dense_replace"]:
        i = c["intermediate_size"]
        out += [
            (p + f"mlp.{n}.weight", "BF16", s)
            for n, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))
        ]
        return sorted(out)
    m = c["moe_intermediate_size"]
    out += [
        (p + "mlp.gate.weight", "BF16", (c["n_routed_experts"], h)),
        (p + "mlp.gate.e_score_correction_bias", "F32", (c["n_routed_experts"],)),
        (p + "mlp.shared_experts.gate_proj.weight", "BF16", (m, h)),
        (p + "mlp.shared_experts.up_proj.weight", "BF16", (m, h)),
        (p + "mlp.shared_experts.down_proj.weight", "BF16", (h, m)),
    ]
    for e in range(c["n_routed_experts"]):
        for proj, (rows, cols) in (("gate_proj", (m, h)), ("up_proj", (m, h)), ("down_proj", (h, m))):
            name = f"{p}mlp.experts.{e}.{proj}.weight"
            out += [(name, "U8", (rows, cols // 2)), (name + "_scale", "U8", (rows, cols // 32))]
    if layer == c["num_hidden_layers"]:
        out += [
            (p + "enorm.weight", "BF16", (h,)),
            (p + "hnorm.weight", "BF16", (h,)),
            (p + "shared_head.norm.weight", "BF16", (h,)),
            (p + "eh_proj.weight", "U8", (h, h)),
            (p + "eh_proj.weight_scale", "U8", (h, 2 * h // 32)),
        ]
    return sorted(out)


def all_tensors() -> tuple[list[tuple[str, str, tuple[int, ...]]], list[tuple[str, str, tuple[int, ...]]]]:
    """(main model tensors in model order, MTP layer tensors)."""
    c = CONFIG
    main = [("model.embed_tokens.weight", "BF16", (c["vocab_size"], c["hidden_size"]))]
    for layer in range(c["num_hidden_layers"]):
        main += layer_tensors(layer)
    main += [
        ("model.norm.weight", "BF16", (c["hidden_size"],)),
        ("lm_head.weight", "BF16", (c["vocab_size"], c["hidden_size"])),
    ]
    return main, layer_tensors(c["num_hidden_layers"])


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def pack(tensors: list[tuple[str, str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        b = nbytes(t[1], t[2])
        if shards[-1] and size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += b
    return shards


def assign_shards() -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Exactly NUM_SHARDS shards in model order; the MTP layer starts a fresh shard."""
    main, mtp = all_tensors()
    lo, hi = 1 << 28, 1 << 34
    while lo < hi:  # smallest size limit that packs into NUM_SHARDS shards
        mid = (lo + hi) // 2
        if len(pack(main, mid)) + len(pack(mtp, mid)) <= NUM_SHARDS:
            hi = mid
        else:
            lo = mid + 1
    shards = pack(main, lo) + pack(mtp, lo)
    while len(shards) < NUM_SHARDS:  # split the largest multi-tensor shard until the count is exact
        i = max(
            (i for i, s in enumerate(shards) if len(s) > 1), key=lambda i: sum(nbytes(t[1], t[2]) for t in shards[i])
        )
        half = len(shards[i]) // 2
        shards[i : i + 1] = [shards[i][:half], shards[i][half:]]
    return shards


def chunks(name: str, dtype: str, shape: tuple[int, ...], seed: int) -> Iterator[bytes]:
    """Deterministic random bytes for one tensor, in bounded chunks."""
    rng = np.random.Generator(
        np.random.PCG64([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
    )
    total = nbytes(dtype, shape)
    step = CHUNK - CHUNK % max(1, DTYPE_SIZES[dtype])
    for start in range(0, total, step):
        n = min(step, total - start)
        if name.endswith("_scale"):
            yield rng.integers(100, 141, n, dtype=np.uint8).tobytes()
        elif dtype == "U8":
            yield rng.bytes(n)
        elif dtype == "BF16":
            values = torch.from_numpy(rng.standard_normal(n // 2, dtype=np.float32) * 0.02)
            yield values.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
        else:
            yield (rng.standard_normal(n // 4, dtype=np.float32) * 0.01).tobytes()


def write_shard(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], seed: int, sparse: bool) -> None:
    with open(path, "wb") as f:
        header = encode_header([TensorSpec(*t) for t in tensors], None)
        f.write(header)
        if sparse:  # zeros are valid data (scale byte 0 is 2^-127); the file system stores none of them
            f.truncate(len(header) + sum(nbytes(d, s) for _, d, s in tensors))
            return
        for name, dtype, shape in tensors:
            for data in chunks(name, dtype, shape, seed):
                f.write(data)


def exclude_list() -> list[str]:
    main, mtp = all_tensors()
    exclude = []
    for name, _dtype, shape in main + mtp:
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(shape) != 2 or module.endswith("norm") or "embed" in module:
            continue
        if ".mlp.experts." in module or module.endswith(".eh_proj"):
            continue
        exclude.append(module)
    return exclude


def config_json() -> dict:
    config = dict(CONFIG)
    config["quantization_config"] = {
        "global_quant_config": {
            "input_tensors": {**MXFP4_SPEC, "is_dynamic": True},
            "weight": MXFP4_SPEC,
            "output_tensors": None,
            "bias": None,
            "target_device": None,
        },
        "exclude": exclude_list(),
        "algo_config": None,
        "softmax_quant_spec": None,
        "quant_method": "quark",
        "layer_type_quant_config": {},
        "layer_quant_config": {},
        "kv_cache_quant_config": {},
        "kv_cache_post_rope": False,
        "quant_mode": "eager_mode",
        "version": "0.13",
        "export": {
            "kv_cache_group": [],
            "min_kv_scale": 0.0,
            "pack_method": "reorder",
            "weight_format": "real_quantized",
            "weight_merge_groups": None,
        },
    }
    return config


def make(out: Path, *, full: bool = False, sparse: bool = False, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mtp_prefix = f"model.layers.{CONFIG['num_hidden_layers']}."
    weight_map: dict[str, str] = {}
    for number, tensors in enumerate(assign_shards(), start=1):
        filename = f"model-{number:05d}-of-{NUM_SHARDS:05d}.safetensors"
        is_mtp = any(t[0].startswith(mtp_prefix) for t in tensors)
        write_shard(out / filename, tensors, seed, sparse=sparse or not (full or is_mtp))
        weight_map.update({t[0]: filename for t in tensors})
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, ensure_ascii=False, indent=4))
    (out / "config.json").write_text(json.dumps(config_json(), indent=4))
    return out


def to_hf_cache(folder: Path, snapshot: Path) -> Path:
    """Move the files into blobs/<sha256> and leave a snapshot of symlinks, as huggingface_hub does."""
    blobs = snapshot.parent.parent / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.replace(path, blobs / digest)
        (snapshot / path.name).symlink_to(os.path.relpath(blobs / digest, snapshot))
    folder.rmdir()
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--full", action="store_true", help="random data in every shard (~430 GB on disk)")
    parser.add_argument("--sparse", action="store_true", help="sparse MTP shards too (seconds, a few MB on disk)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-cache", action="store_true", help="lay OUT out as a Hugging Face cache snapshot")
    args = parser.parse_args()
    if args.hf_cache:
        staging = args.out.parent / f".{args.out.name}.staging"
        path = to_hf_cache(make(staging, full=args.full, sparse=args.sparse, seed=args.seed), args.out)
    else:
        path = make(args.out, full=args.full, sparse=args.sparse, seed=args.seed)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"wrote {path}: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
