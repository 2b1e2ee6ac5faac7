"""Decode speed of the bundled runtime at batch 1, with and without MTP, against transformers' generate().

Run on a GPU machine. Rows: plain greedy decoding and MTP speculative decoding (k draft steps),
each with CUDA graphs (the default on a GPU) and eagerly; the same prompts through transformers'
GlmMoeDsaForCausalLM.generate() (bf16, greedy, its own KV cache) as the peer. Every row decodes
the same prompts; the table says whether its tokens equal plain decoding's.

The floor of a decode step is the bytes it must read (every weight of the main model, the routed
experts included since the runtime computes them densely, plus the whole static KV cache) over
the memory bandwidth measured here with a large device-to-device copy.

Usage: python scripts/bench_runtime.py [--checkpoint bundled:tiny-glm5-trained] [--new-tokens 256]
       [--prompts 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from glm5conv.bundled import resolve_source
from glm5conv.runtime import load_model
from glm5conv.runtime.generate import Decoder
from glm5conv.runtime.weights import checkpoint_tensors
from glm5conv.shard import TensorSpec, encode_header


def prompts_from_stdlib(tokenizer, count: int, length: int = 64) -> list[list[int]]:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "test" not in p.parts)
    rng = random.Random(0)
    out = []
    while len(out) < count:
        data = rng.choice(files).read_bytes()
        if len(data) > 4 * length:
            start = rng.randrange(0, len(data) - 2 * length)
            out.append(tokenizer.encode(data[start : start + length].decode("utf-8", "replace"))[:length])
    return out


def bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3)


def run_decoder(decoder: Decoder, prompts: list[list[int]], new_tokens: int, steps: int) -> dict:
    decoder.generate(prompts[0], 16, speculative_num_steps=steps)  # warm-up (and graph capture)
    tokens, seconds, accepts, outputs = 0, 0.0, [], []
    for prompt in prompts:
        torch.cuda.synchronize()
        result = decoder.generate(prompt, new_tokens, speculative_num_steps=steps)
        tokens += len(result.token_ids)
        seconds += result.seconds
        accepts += result.accept_lengths
        outputs.append(result.token_ids)
    return {
        "tokens_per_s": tokens / seconds,
        "step_ms": 1e3 * seconds / (len(accepts) if accepts else tokens),
        "mean_accept_length": sum(accepts) / len(accepts) if accepts else None,
        "outputs": outputs,
    }


def run_transformers(loaded, prompts: list[list[int]], new_tokens: int) -> dict:
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tensors = {
            k: v.to("cpu", torch.bfloat16 if v.is_floating_point() and not k.endswith("bias") else v.dtype)
            for k, v in checkpoint_tensors(loaded.model).items()
        }
        dtypes = {torch.bfloat16: "BF16", torch.float32: "F32"}
        names = sorted(tensors)
        with open(Path(tmp) / "model.safetensors", "wb") as f:
            f.write(
                encode_header(
                    [TensorSpec(n, dtypes[tensors[n].dtype], tuple(tensors[n].shape)) for n in names], {"format": "pt"}
                )
            )
            for n in names:
                f.write(tensors[n].contiguous().view(torch.uint8).numpy().tobytes())
        config = json.loads((loaded.path / "config.json").read_text())
        config.pop("quantization_config", None)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        model = transformers.GlmMoeDsaForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 2}
    model.generate(torch.tensor([prompts[0]], device="cuda"), **(kwargs | {"max_new_tokens": 16, "min_new_tokens": 16}))
    tokens, seconds, outputs = 0, 0.0, []
    for prompt in prompts:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(torch.tensor([prompt], device="cuda"), **kwargs)
        torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        new = out[0, len(prompt) :].tolist()
        tokens += len(new)
        outputs.append(new)
    return {
        "tokens_per_s": tokens / seconds,
        "step_ms": 1e3 * seconds / tokens,
        "mean_accept_length": None,
        "outputs": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bundled:tiny-glm5-trained")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", default="1,2,3,4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_model(resolve_source(args.checkpoint), device="cuda", dtype="bfloat16")
    model = loaded.model
    prompts = prompts_from_stdlib(loaded.tokenizer, args.prompts)
    rows: dict[str, dict] = {}
    for graphs in (True, False):
        decoder = Decoder(model, cuda_graphs=graphs)
        tag = "CUDA graphs" if graphs else "eager"
        rows[f"plain greedy ({tag})"] = run_decoder(decoder, prompts, args.new_tokens, 0)
        for k in [int(s) for s in args.steps.split(",")]:
            rows[f"MTP k={k} ({tag})"] = run_decoder(decoder, prompts, args.new_tokens, k)
    rows["transformers generate() (bf16, eager)"] = run_transformers(loaded, prompts, args.new_tokens)

    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("mtp."))
    cache_bytes = (
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith("caches."))
        * model.args.num_hidden_layers
        // (model.args.num_hidden_layers + 1)
    )
    bw = bandwidth(torch.device("cuda"))
    floor_ms = 1e3 * (weight_bytes + cache_bytes) / bw
    reference = rows["plain greedy (CUDA graphs)"]
    plain_tps = reference["tokens_per_s"]
    peer_tps = rows["transformers generate() (bf16, eager)"]["tokens_per_s"]
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.prompts} prompts x {args.new_tokens} new tokens, batch 1, bf16"
    )
    print(
        f"decode-step floor: {(weight_bytes + cache_bytes) / 1e6:.1f} MB read / {bw / 1e12:.2f} TB/s = {floor_ms * 1e3:.1f} us\n"
    )
    print(
        "| decoding | tokens/s | ms per step | step / floor | mean accept length | vs plain (graphs) | vs transformers | same tokens as plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        same = sum(a == b for a, b in zip(row["outputs"], reference["outputs"], strict=True))
        accept = f"{row['mean_accept_length']:.2f}" if row["mean_accept_length"] else "-"
        print(
            f"| {name} | {row['tokens_per_s']:.0f} | {row['step_ms']:.2f} | {row['step_ms'] / floor_ms:.0f}x | {accept} | "
            f"{row['tokens_per_s'] / plain_tps:.2f}x | {row['tokens_per_s'] / peer_tps:.1f}x | {same}/{len(prompts)} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in rows.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
