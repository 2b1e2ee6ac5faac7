"""The model arguments the runtime needs, read from a GLM-5 (or DeepSeek-V3-style) config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_nextn_predict_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    index_topk: int
    index_head_dim: int
    index_n_heads: int
    indexer_types: tuple[str, ...]
    eos_token_ids: tuple[int, ...]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mtp_layer(self) -> int:
        return self.num_hidden_layers

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def indexer_kind(self, layer: int) -> str:
        """'full' runs the DSA indexer, 'shared' reuses the previous full layer's selection."""
        return self.indexer_types[layer] if layer < len(self.indexer_types) else "full"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        layers = config["num_hidden_layers"]
        indexer_types = config.get("indexer_types")
        if indexer_types is None:
            pattern = config.get("index_topk_pattern")
            if pattern is not None:
                indexer_types = [{"F": "full", "S": "shared"}[c] for c in pattern]
            else:  # transformers' default: every layer runs its own indexer unless index_topk_freq says otherwise
                freq = max(config.get("index_topk_freq", 1), 1)
                offset = config.get("index_skip_topk_offset", 2)
                indexer_types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(layers)]
        eos = config.get("eos_token_id")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            moe_intermediate_size=config["moe_intermediate_size"],
            num_hidden_layers=layers,
            num_nextn_predict_layers=config.get("num_nextn_predict_layers", 0),
            first_k_dense_replace=config.get("first_k_dense_replace", 0),
            num_attention_heads=config["num_attention_heads"],
            q_lora_rank=config["q_lora_rank"],
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            n_routed_experts=config["n_routed_experts"],
            n_shared_experts=config.get("n_shared_experts", 1),
            num_experts_per_tok=config["num_experts_per_tok"],
            n_group=config.get("n_group", 1),
            topk_group=config.get("topk_group", 1),
            norm_topk_prob=config.get("norm_topk_prob", True),
            routed_scaling_factor=config.get("routed_scaling_factor", 1.0),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            index_topk=config.get("index_topk", 2048),
            index_head_dim=config.get("index_head_dim", 128),
            index_n_heads=config.get("index_n_heads", 64),
            indexer_types=tuple(indexer_types),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )
