"""The runtime against transformers' GlmMoeDsaForCausalLM and amd-quark; speculative decoding exactness."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from glm5conv.runtime import load_model
from glm5conv.runtime.generate import Sampler
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(REPO / "scripts"))
import make_tiny_checkpoint  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory) -> Path:
    """A tiny bf16 GLM-5 checkpoint with an MTP layer, written the way transformers lays it out.

    8 indexer heads: with 2, relu makes many index scores exactly 0, and transformers' topk breaks
    such ties in a length-dependent way no other implementation can (or should) reproduce.
    """
    path = tmp_path_factory.mktemp("tiny") / "bf16"
    state = make_tiny_checkpoint.bf16_state(seed=3, index_n_heads=8)
    make_tiny_checkpoint.write_bf16_checkpoint(state, path, index_n_heads=8)
    return path


def hf_model(path: Path):
    model = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


PROMPTS = [
    [5, 17, 200, 33, 9, 41, 77, 3, 128, 250, 66, 12],
    list(range(30, 60)),
]  # the second is longer than index_topk


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "beyond-index-topk"])
def test_prefill_logits_match_transformers(bf16_ckpt: Path, prompt: list[int]) -> None:
    reference = hf_model(bf16_ckpt)
    assert reference.config.index_topk < 30
    ours = load_model(bf16_ckpt, device="cpu", dtype="float32")
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    ours.decoder._ensure_cache(len(prompt))
    logits, _ = ours.model(torch.tensor([prompt]), torch.arange(len(prompt)), len(prompt))
    assert rel_err(logits[0], expected) < 1e-4


def test_decode_with_cache_matches_transformers(bf16_ckpt: Path) -> None:
    reference = hf_model(bf16_ckpt)
    ours = load_model(bf16_ckpt, device="cpu", dtype="float32")
    prompt, steps = PROMPTS[0], 24  # crosses index_topk (8) with the cache
    with torch.no_grad():
        out = reference(torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        ours.decoder._ensure_cache(len(prompt) + steps)
        logits, _ = ours.model(torch.tensor([prompt]), torch.arange(len(prompt)), len(prompt))
        assert rel_err(logits[0, -1], out.logits[0, -1]) < 1e-4
        token = out.logits[0, -1].argmax()
        for step in range(steps):
            out = reference(token.view(1, 1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits, _ = ours.model(token.view(1, 1), torch.tensor([len(prompt) + step]), len(prompt) + step + 1)
            assert rel_err(logits[0, -1], out.logits[0, -1]) < 1e-4, step
            token = out.logits[0, -1].argmax()


def test_mtp_layer_matches_transformers_decoder_layer(bf16_ckpt: Path) -> None:
    """Our MTP forward against transformers' own decoder layer fed eh_proj(cat(enorm(e), hnorm(h)))."""
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf

    reference = hf_model(bf16_ckpt)
    config = reference.config
    layer = hf.GlmMoeDsaDecoderLayer(config, 1)  # an MoE layer with an indexer, like the MTP layer
    mtp = {}
    for shard in sorted(bf16_ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            mtp |= {
                k[len("model.layers.2.") :]: f.get_tensor(k).float()
                for k in f.keys()
                if k.startswith("model.layers.2.")
            }
    experts = config.n_routed_experts
    state = {
        k: v
        for k, v in mtp.items()
        if ".experts." not in k and not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head"))
    }
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [
            torch.cat([mtp[f"mlp.experts.{e}.gate_proj.weight"], mtp[f"mlp.experts.{e}.up_proj.weight"]])
            for e in range(experts)
        ]
    )
    state["mlp.experts.down_proj"] = torch.stack([mtp[f"mlp.experts.{e}.down_proj.weight"] for e in range(experts)])
    layer.load_state_dict(state, strict=True)
    layer.eval()

    ours = load_model(bf16_ckpt, device="cpu", dtype="float32")
    prompt = PROMPTS[0]
    n = len(prompt)
    with torch.no_grad():
        ours.decoder._ensure_cache(n + 1)
        _, hidden = ours.model(torch.tensor([prompt]), torch.arange(n), n)
        nxt = torch.tensor([prompt[1:] + [7]])
        logits, _ = ours.model.forward_mtp(nxt, hidden, torch.arange(n), n)

        def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

        emb = reference.model.embed_tokens(nxt)
        x = (
            torch.cat([norm(emb, mtp["enorm.weight"]), norm(hidden, mtp["hnorm.weight"])], -1)
            @ mtp["eh_proj.weight"].t()
        )
        positions = torch.arange(n)[None]
        rope = reference.model.rotary_emb(x, positions)
        mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
        x, _ = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        expected = reference.lm_head(norm(x, mtp["shared_head.norm.weight"]))
    assert rel_err(logits, expected) < 1e-4


def quark_dequantized_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with every MXFP4 weight dequantized by amd-quark and no quantization_config."""
    from tests.test_codec import quark_dequantize

    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(src / shard, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale"):
            continue
        out[name] = (
            quark_dequantize(tensor, tensors[name + "_scale"]).to(torch.bfloat16)
            if name + "_scale" in tensors
            else tensor
        )
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_mxfp4_weights_match_quark_dequantized_model(tmp_path: Path, bundled: Path) -> None:
    pytest.importorskip("quark")
    reference = hf_model(quark_dequantized_copy(bundled, tmp_path / "dequantized"))
    ours = load_model(bundled, device="cpu", dtype="float32")  # MXFP4 decoded by glm5conv's codec
    prompt = PROMPTS[0][:8]  # within index_topk: the 2-head indexer's exact-zero ties play no part
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    ours.decoder._ensure_cache(len(prompt))
    logits, _ = ours.model(torch.tensor([prompt]), torch.arange(len(prompt)), len(prompt))
    assert rel_err(logits[0], expected) < 1e-4


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_greedy_speculative_equals_plain_greedy(bf16_ckpt: Path, steps: int) -> None:
    model = load_model(bf16_ckpt, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(steps)
    for _ in range(6):
        prompt = torch.randint(3, 256, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        plain = model.generate(prompt, 40, stop_at_eos=False)
        spec = model.generate(prompt, 40, speculative_num_steps=steps, stop_at_eos=False)
        assert spec.token_ids == plain.token_ids
        assert sum(spec.accept_lengths) == 39  # the first token comes from the prefill
        assert all(1 <= a <= steps + 1 for a in spec.accept_lengths)


def test_acceptance_rule_keeps_the_target_distribution() -> None:
    """Speculative sampling's accept/resample step, alone: the emitted token follows p, whatever q is."""
    from glm5conv.runtime.generate import Decoder

    decoder = Decoder.__new__(Decoder)
    decoder.device = torch.device("cpu")
    sampler = Sampler(1.0, torch.device("cpu"), seed=0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0] * 5])
    q = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 0.0, -2.0]), -1)
    p = torch.softmax(p_logits[0], -1)
    counts = torch.zeros(5)
    trials = 20000
    for _ in range(trials):
        draft = sampler.sample_probs(q)
        accepted, bonus = decoder._accept(sampler, p_logits, [draft], [q])
        counts[int(draft) if accepted else int(bonus)] += 1
    chi2 = float(((counts - trials * p) ** 2 / (trials * p)).sum())
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


def test_speculative_sampling_distribution_end_to_end(bf16_ckpt: Path) -> None:
    """The second generated token's distribution with MTP equals the exact one without it."""
    model = load_model(bf16_ckpt, device="cpu", dtype="float32")
    prompt, temperature = [5, 17, 200, 33], 0.7
    m = model.model
    model.decoder._ensure_cache(16)
    with torch.no_grad():
        logits, _ = m(torch.tensor([prompt]), torch.arange(len(prompt)), len(prompt))
        first = torch.softmax(logits[0, -1] / temperature, -1)
        exact = torch.zeros(m.args.vocab_size)
        for t1 in torch.nonzero(first > 1e-6).flatten().tolist():
            nxt, _ = m(torch.tensor([prompt + [t1]]), torch.arange(len(prompt) + 1), len(prompt) + 1)
            exact += first[t1] * torch.softmax(nxt[0, -1] / temperature, -1)
    counts = torch.zeros(m.args.vocab_size)
    runs = 3000
    for seed in range(runs):
        out = model.generate(prompt, 2, temperature=temperature, speculative_num_steps=3, seed=seed, stop_at_eos=False)
        counts[out.token_ids[1]] += 1
    keep = exact * runs >= 5  # chi-square bins: tokens expected at least 5 times, the rest pooled
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([exact[keep], exact[~keep].sum().view(1)]) * runs
    chi2 = float(((observed - expected) ** 2 / expected.clamp(min=1e-9)).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 4 * math.sqrt(2 * dof)  # ~ p > 0.001 for chi-square with dof degrees


def test_converted_checkpoint_gives_the_same_tokens(tmp_path: Path, bundled: Path) -> None:
    """The runtime reads MXFP4 and bf16 alike: the bundled checkpoint and its conversions generate identically."""
    prompt = [5, 17, 200, 33, 9]
    base = load_model(bundled, device="cpu").generate(prompt, 24, speculative_num_steps=2, stop_at_eos=False)
    for to, scope in (("bf16", "eh-proj"), ("bf16", "mtp")):
        convert(bundled, tmp_path / f"{to}-{scope}", ConvertOptions(to=to, scope=scope))
        other = load_model(tmp_path / f"{to}-{scope}", device="cpu").generate(
            prompt, 24, speculative_num_steps=2, stop_at_eos=False
        )
        assert other.token_ids == base.token_ids and other.accept_lengths == base.accept_lengths


def test_generate_command_json(capsys) -> None:
    from tests.helpers import run_cli

    code, out, _ = run_cli(
        ["generate", "bundled:", "--prompt-ids", "5,17,200", "--max-new-tokens", "12", "--json"], capsys
    )
    doc = json.loads(out)
    assert code == 0
    assert set(doc) >= {"token_ids", "text", "accept_lengths", "mean_accept_length", "tokens_per_s"}
    assert len(doc["token_ids"]) == 12 and doc["text"] is None and sum(doc["accept_lengths"]) == 11
    code, plain, _ = run_cli(
        [
            "generate",
            "bundled:",
            "--prompt-ids",
            "5,17,200",
            "--max-new-tokens",
            "12",
            "--speculative-num-steps",
            "0",
            "--json",
        ],
        capsys,
    )
    assert json.loads(plain)["token_ids"] == doc["token_ids"] and json.loads(plain)["accept_lengths"] == []
    code, _, err = run_cli(["generate", "bundled:", "--prompt", "hi"], capsys)
    assert code == 2 and "no tokenizer" in err
