"""Train a small GLM-5-architecture model with its MTP layer, so that MTP acceptance means something.

Data: the Python standard library's own source files (available offline everywhere), as bytes.
Tokenizer: byte-level (ids 3..258 are the bytes; 0 <bos>, 1 <eos>, 2 <pad>), saved as
glm5conv-tokenizer.json beside the weights. Model: glm5conv's runtime model itself (checked
against transformers' GlmMoeDsaForCausalLM by the tests), trained without a KV cache. Loss, as
DeepSeek-V3's MTP: cross-entropy of the main model on token t+1, plus 0.3 x cross-entropy of the
MTP layer on token t+2 from (h_t, embed(token t+1)), h_t being the main model's final-normed
hidden state, as SGLang's EAGLE/NEXTN worker feeds it.

Writes a bf16 checkpoint (GLM-5 tensor names, config.json, tokenizer) to --out. Quantize it with
the GLM-5-MXFP4 recipe afterwards: `python scripts/make_tiny_checkpoint.py --from-bf16 DIR --out ...`.

Usage (GPU, ~7 minutes on an H100): python scripts/train_tiny_glm5.py --out OUT [--minutes 7]
Smoke run on a CPU: python scripts/train_tiny_glm5.py --out /tmp/t --device cpu --max-steps 2 --batch 2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glm5conv.runtime.config import ModelArgs
from glm5conv.runtime.model import GLM5
from glm5conv.runtime.tokenizer import ByteTokenizer
from glm5conv.runtime.weights import checkpoint_tensors
from glm5conv.shard import TensorSpec, encode_header

TOKENIZER = ByteTokenizer(3, {"<bos>": 0, "<eos>": 1, "<pad>": 2})
CONFIG = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": "glm_moe_dsa",
    "vocab_size": TOKENIZER.vocab_size,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "index_topk": 1024,
    "index_head_dim": 32,
    "index_n_heads": 4,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "initializer_range": 0.02,
    "dtype": "bfloat16",
}


def corpus(holdout_every: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams from the stdlib sources; every 20th file is held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    train, held = [], []
    for i, path in enumerate(files):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        ids = [0] + [b + TOKENIZER.offset for b in data] + [1]
        (held if i % holdout_every == 0 else train).extend(ids)
    return torch.tensor(train, dtype=torch.int64), torch.tensor(held, dtype=torch.int64)


def init_weights(model: GLM5, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or "k_norm.weight" in name:
            torch.nn.init.ones_(param)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(param)
        else:
            param.data.copy_(torch.randn(param.shape, generator=g) * CONFIG["initializer_range"])


def losses(model: GLM5, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = batch[:, :-1]
    positions = torch.arange(inputs.shape[1], device=batch.device)
    logits, hidden = model(inputs, positions)
    main = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    # MTP at position i: (token i+1, hidden i) -> token i+2
    mtp_logits, _ = model.forward_mtp(batch[:, 1:-1], hidden[:, :-1], positions[:-1])
    mtp = F.cross_entropy(mtp_logits.float().reshape(-1, mtp_logits.shape[-1]), batch[:, 2:].reshape(-1))
    return main, mtp


def save_checkpoint(model: GLM5, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in checkpoint_tensors(model).items():
        keep_fp32 = name.endswith("e_score_correction_bias")
        tensors[name] = tensor.detach().to("cpu", torch.float32 if keep_fp32 else torch.bfloat16).contiguous()
    names = sorted(tensors)
    dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}
    filename = "model.safetensors"
    with open(out / filename, "wb") as f:
        f.write(
            encode_header(
                [TensorSpec(n, dtype[tensors[n].dtype], tuple(tensors[n].shape)) for n in names], {"format": "pt"}
            )
        )
        for n in names:
            f.write(tensors[n].view(torch.uint8).numpy().tobytes())
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    TOKENIZER.save(out)


@torch.no_grad()
def held_out_acceptance(model: GLM5, held: torch.Tensor, device: torch.device, prompts: int = 8) -> float:
    from glm5conv.runtime.generate import Decoder

    model.eval()
    decoder = Decoder(model)
    rng = random.Random(0)
    lengths = []
    for _ in range(prompts):
        start = rng.randrange(0, len(held) - 200)
        result = decoder.generate(held[start : start + 64].tolist(), 64, speculative_num_steps=3, stop_ids=(1,))
        lengths += result.accept_lengths
    model.caches = None
    model.train()
    return sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=7.0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, held = corpus()
    print(f"corpus: {len(train) / 1e6:.1f} M train tokens, {len(held) / 1e6:.2f} M held out")
    model_args = ModelArgs.from_config(CONFIG)
    model = GLM5(model_args)
    init_weights(model, args.seed)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    budget = args.minutes * 60
    warmup = 100
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    step = 0
    log = []
    while step < args.max_steps and time.time() - start < budget:
        frac = min(1.0, (time.time() - start) / budget)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(train) - args.seq - 2, (args.batch,), generator=generator)
        batch = torch.stack([train[o : o + args.seq + 2] for o in offsets.tolist()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            main_loss, mtp_loss = losses(model, batch)
            loss = main_loss + 0.3 * mtp_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            entry = {
                "step": step,
                "seconds": round(time.time() - start, 1),
                "main": round(main_loss.item(), 4),
                "mtp": round(mtp_loss.item(), 4),
                "lr": round(lr, 6),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
    with torch.no_grad():
        offsets = torch.randint(0, len(held) - args.seq - 2, (16,), generator=generator)
        batch = torch.stack([held[o : o + args.seq + 2] for o in offsets.tolist()]).to(device)
        main_loss, mtp_loss = losses(model, batch)
    accept = held_out_acceptance(model, held, device)
    summary = {
        "steps": step,
        "held_out_main_loss": round(main_loss.item(), 4),
        "held_out_mtp_loss": round(mtp_loss.item(), 4),
        "held_out_mean_accept_length_k3": round(accept, 3),
        "minutes": round((time.time() - start) / 60, 2),
    }
    print(json.dumps(summary), flush=True)
    save_checkpoint(model, args.out)
    (args.out / "training-log.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1) + "\n")


if __name__ == "__main__":
    main()
