"""glm5conv generate CKPT"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.options import JsonOption
from glm5conv.cli.render import stdout_console
from glm5conv.errors import UsageError

EXAMPLES = """Examples:

  glm5conv generate bundled:tiny-glm5-trained --prompt "def fib(n):" --max-new-tokens 64
  glm5conv generate out/tiny-bf16 --prompt-ids 3,14,15 --speculative-num-steps 0 --json
"""

DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... (auto: cuda when available).")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32 or bfloat16 compute.")]


@app.command("generate", epilog=EXAMPLES)
def generate_cmd(
    checkpoint: Annotated[str, typer.Argument(help="GLM-5-architecture checkpoint folder, or bundled:NAME.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt text (needs the checkpoint's tokenizer).")
    ] = None,
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", help="Prompt token ids, comma-separated.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    speculative_num_steps: Annotated[
        int, typer.Option("--speculative-num-steps", min=0, help="Draft tokens per step; 0 = no MTP.")
    ] = 3,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
) -> int:
    """Generate with the bundled runtime, MTP speculative decoding on by default."""
    from glm5conv.runtime import load_model

    if (prompt is None) == (prompt_ids is None):
        raise UsageError("give exactly one of --prompt and --prompt-ids")
    loaded = load_model(resolve_source(checkpoint), device=device, dtype=dtype)
    if prompt is not None:
        if loaded.tokenizer is None:
            raise UsageError(f"{checkpoint}: no tokenizer (glm5conv-tokenizer.json): use --prompt-ids")
        ids = loaded.tokenizer.encode(prompt)
    else:
        try:
            ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers") from None
        if not ids or any(not 0 <= t < loaded.model.args.vocab_size for t in ids):
            raise UsageError(f"--prompt-ids: need token ids in [0, {loaded.model.args.vocab_size})")
    if speculative_num_steps and not loaded.has_mtp:
        raise UsageError(f"{checkpoint}: no MTP layer; use --speculative-num-steps 0")
    result = loaded.generate(ids, max_new_tokens, temperature, speculative_num_steps, seed)
    text = loaded.tokenizer.decode(result.token_ids) if loaded.tokenizer else None
    doc = {
        "token_ids": result.token_ids,
        "text": text,
        "accept_lengths": result.accept_lengths,
        "mean_accept_length": result.mean_accept_length,
        "tokens_per_s": round(result.tokens_per_s, 3),
        "finish_reason": result.finish_reason,
    }
    if json_output:
        print(json.dumps(doc))
        return 0
    console = stdout_console()
    console.print(text if text is not None else " ".join(map(str, result.token_ids)), markup=False, highlight=False)
    stats = f"{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s"
    if result.mean_accept_length is not None:
        stats += f", mean accept length {result.mean_accept_length:.2f} ({speculative_num_steps} draft steps)"
    typer.echo(stats, err=True)
    return 0
