"""GLM-5 (GlmMoeDsaForCausalLM) with its MTP layer, in plain device-agnostic PyTorch.

Follows FACTS.md §1 and transformers' reference implementation: MLA attention with low-rank q/kv
projections and interleaved RoPE, the DSA indexer choosing the top-k keys per query, dense first
layers, sigmoid-routed MoE with correction bias, shared expert and routed scaling, and the
DeepSeek-V3-style MTP layer (eh_proj over [enorm(embed), hnorm(hidden)]).

The KV cache is allocated once at a fixed length and every step attends over all of it with a
validity mask, so shapes never change between decode steps (CUDA graphs / torch.compile friendly).
Routed experts are computed densely and weighted by a (mostly zero) routing matrix for the same
reason: exact for the tiny models this runtime serves, and free of data-dependent shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5conv.runtime.config import ModelArgs

NEG = torch.finfo(torch.float32).min


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(args: ModelArgs, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dim = args.qk_rope_head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.arange(max_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE: pairs (x0, x1), (x2, x3)... rotate; the result lists evens then odds."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache(nn.Module):
    """One layer's cache: the normalized MLA latent, the roped shared key, the indexer key."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("latent", torch.zeros(batch, max_len, args.kv_lora_rank, dtype=dtype, device=device))
        self.register_buffer("k_rope", torch.zeros(batch, max_len, args.qk_rope_head_dim, dtype=dtype, device=device))
        self.register_buffer("index_k", torch.zeros(batch, max_len, args.index_head_dim, dtype=dtype, device=device))


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` best positions per row; among equal scores the later position wins.

    torch.topk breaks ties differently for different row lengths (and relu makes exact zeros
    common), which would let a verify pass over several tokens select other keys than decoding
    them one at a time. A stable sort of the reversed row gives one rule for every length.
    """
    length = scores.shape[-1]
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., : min(k, length)]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, length - 1 - order, True)


class Indexer(nn.Module):
    """DSA: scores every cached key for each query and keeps the top ``index_topk``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.wq_b = nn.Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, args.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(args.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, args.index_n_heads, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        q_resid: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Boolean [B, S, L]: which cached positions each query may attend to."""
        a = self.args
        capacity = valid.shape[-1] if cache is None else cache.index_k.shape[1]
        if capacity <= a.index_topk:
            # no row can ever have more than k keys, and top-k of at most k keys keeps them all:
            # skip the scoring (and the indexer cache, which is then never read)
            return valid.expand(x.shape[0], -1, -1)
        b, s, _ = x.shape
        rope = a.qk_rope_head_dim
        q = self.wq_b(q_resid).view(b, s, a.index_n_heads, a.index_head_dim)
        q = torch.cat([apply_rope(q[..., :rope], cos[:, None], sin[:, None]), q[..., rope:]], dim=-1)
        k = self.k_norm(self.wk(x))
        k = torch.cat([apply_rope(k[..., :rope], cos, sin), k[..., rope:]], dim=-1)
        if cache is None:  # training / cache-free: the keys are this sequence's
            keys = k.float()
        else:
            cache.index_k.index_copy_(1, positions, k.to(cache.index_k.dtype))
            keys = cache.index_k[:, : valid.shape[-1]].float()
        scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), keys) * a.index_head_dim**-0.5)
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * a.index_n_heads**-0.5
        index_scores = torch.einsum("bsh,bsht->bst", weights, scores).masked_fill(~valid, float("-inf"))
        return top_positions(index_scores, a.index_topk) & valid


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.args = args
        h = args.num_attention_heads
        self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6)
        self.q_b_proj = nn.Linear(args.q_lora_rank, h * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * args.v_head_dim, args.hidden_size, bias=False)
        self.indexer = Indexer(args) if args.indexer_kind(layer) == "full" else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        valid: torch.Tensor,
        shared_select: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        b, s, _ = x.shape
        heads = a.num_attention_heads
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(b, s, heads, a.qk_head_dim)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None])
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin)
        length = valid.shape[-1]
        if cache is not None:  # without a cache (training) the keys are this sequence's
            cache.latent.index_copy_(1, positions, latent.to(cache.latent.dtype))
            cache.k_rope.index_copy_(1, positions, k_rope.to(cache.k_rope.dtype))
            latent, k_rope = cache.latent[:, :length].to(x.dtype), cache.k_rope[:, :length].to(x.dtype)

        select = shared_select if self.indexer is None else self.indexer(x, q_resid, cos, sin, positions, cache, valid)
        kv = self.kv_b_proj(latent).view(b, length, heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, value = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        scores = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
        scores = scores.float() * a.qk_head_dim**-0.5
        scores = scores.masked_fill(~select[:, None], NEG)
        probs = scores.softmax(-1).to(x.dtype)
        out = torch.einsum("bhst,bthd->bshd", probs, value).reshape(b, s, heads * a.v_head_dim)
        return self.o_proj(out), select


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sigmoid routing with correction bias (noaux_tc), top-k, normalised, scaled; plus a shared expert."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        e, h, i = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_weight = nn.Parameter(torch.zeros(e, h, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))
        self.w_gate = nn.Parameter(torch.zeros(e, i, h))
        self.w_up = nn.Parameter(torch.zeros(e, i, h))
        self.w_down = nn.Parameter(torch.zeros(e, h, i))
        self.shared_experts = MLP(h, i * args.n_shared_experts)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [T, E] routing weights (zero for experts not chosen)."""
        a = self.args
        with torch.autocast(x.device.type, enabled=False):  # the router runs in float32, also in training
            scores = (x.float() @ self.gate_weight.float().t()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if a.n_group > 1:
            groups = choice.view(-1, a.n_group, a.n_routed_experts // a.n_group)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(a.topk_group, dim=-1).indices, 1.0)
            mask = keep[:, :, None].expand_as(groups).reshape(-1, a.n_routed_experts)
            choice = choice.masked_fill(mask == 0, float("-inf"))
        top = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, top)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * a.routed_scaling_factor
        return torch.zeros_like(scores).scatter(1, top, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.routing(flat)
        gate = torch.einsum("th,eih->tei", flat, self.w_gate)
        up = torch.einsum("th,eih->tei", flat, self.w_up)
        down = torch.einsum("tei,ehi->teh", F.silu(gate) * up, self.w_down)
        routed = (down * route[:, :, None].to(down.dtype)).sum(1)
        return (routed + self.shared_experts(flat)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp: nn.Module = MoE(args) if args.is_moe(layer) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, positions, cache, valid, shared_select):
        attn, select = self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, valid, shared_select)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), select


class MTPLayer(nn.Module):
    """h = eh_proj(cat(enorm(embed(next token)), hnorm(hidden))) -> decoder layer -> shared_head.norm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.decoder = DecoderLayer(args, args.mtp_layer)
        self.shared_head_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class GLM5(nn.Module):
    """The main model plus (when present) the MTP layer; ``forward`` / ``forward_mtp`` fill caches."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = MTPLayer(args) if args.num_nextn_predict_layers else None
        self.caches: nn.ModuleList | None = None
        self.max_len = 0

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate the static caches (main layers, then the MTP layer) and RoPE tables."""
        param = self.lm_head.weight
        n = self.args.num_hidden_layers + (1 if self.mtp is not None else 0)
        self.caches = nn.ModuleList(KVCache(self.args, batch, max_len, param.dtype, param.device) for _ in range(n))
        self.max_len = max_len
        cos, sin = rope_tables(self.args, max_len, param.device)
        self.register_buffer("rope_cos", cos.to(param.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(param.dtype), persistent=False)
        self.register_buffer("arange", torch.arange(max_len, device=param.device), persistent=False)

    def _valid(self, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        """[1, S, kv_len]: query at position p sees cached positions <= p (later slots are stale or empty).

        ``kv_len`` (the cache length in use) keeps eager steps short; ``None`` attends over the
        whole static cache, for captured graphs. Without caches (training) the keys are the
        sequence itself and the mask is plain causal.
        """
        if self.caches is None:
            return (positions[None, :] <= positions[:, None])[None]
        arange = self.arange if kv_len is None else self.arange[:kv_len]
        return (arange[None, :] <= positions[:, None])[None]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.caches is None:
            cos, sin = rope_tables(self.args, int(positions.max()) + 1, positions.device)
            return cos[positions].to(self.lm_head.weight.dtype), sin[positions].to(self.lm_head.weight.dtype)
        return self.rope_cos[positions], self.rope_sin[positions]

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model over ``tokens`` [B, S] at ``positions`` [S]: (logits, hidden after the final norm)."""
        x = self.embed_tokens(tokens)
        cos, sin = self._rope(positions)
        valid = self._valid(positions, kv_len)
        caches = self.caches if self.caches is not None else [None] * len(self.layers)
        select = None
        for layer, cache in zip(self.layers, caches, strict=False):
            x, select = layer(x, cos, sin, positions, cache, valid, select)
        hidden = self.norm(x)
        return self.lm_head(hidden), hidden

    def forward_mtp(
        self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft: ``tokens[i]`` is the token after the one whose main hidden state is ``hidden[i]``.

        Positions are those of the hidden states, as SGLang's EAGLE/NEXTN worker passes them.
        Returns (logits, the MTP layer's normed output, fed back for the next draft step).
        """
        mtp = self.mtp
        x = mtp.eh_proj(torch.cat([mtp.enorm(self.embed_tokens(tokens)), mtp.hnorm(hidden)], dim=-1))
        cos, sin = self._rope(positions)
        cache = self.caches[-1] if self.caches is not None else None
        x, _ = mtp.decoder(x, cos, sin, positions, cache, self._valid(positions, kv_len), None)
        out = mtp.shared_head_norm(x)
        return self.lm_head(out), out
