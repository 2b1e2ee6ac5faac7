"""A compact GLM-5 runtime with MTP speculative decoding (see model.py and generate.py).

from glm5conv.runtime import load_model
model = load_model("out/tiny-glm5-bf16", device="cpu", dtype="float32")
result = model.generate([1, 2, 3], max_new_tokens=32, speculative_num_steps=3)
result.token_ids, result.accept_lengths, result.mean_accept_length
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from glm5conv.checkpoint import open_checkpoint
from glm5conv.errors import UsageError
from glm5conv.runtime.generate import Decoder, GenerateResult
from glm5conv.runtime.model import GLM5
from glm5conv.runtime.tokenizer import ByteTokenizer, load_tokenizer
from glm5conv.runtime.weights import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["LoadedModel", "GenerateResult", "load_model"]


@dataclass
class LoadedModel:
    """A checkpoint ready to generate: the model, its decoder and (if present) its tokenizer."""

    path: Path
    model: GLM5
    tokenizer: ByteTokenizer | None
    decoder: Decoder

    @property
    def has_mtp(self) -> bool:
        return self.model.mtp is not None

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        speculative_num_steps: int = 0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerateResult:
        stop = self.model.args.eos_token_ids if stop_at_eos else ()
        return self.decoder.generate(
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            speculative_num_steps=speculative_num_steps,
            seed=seed,
            stop_ids=stop,
            on_tokens=on_tokens,
        )


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA/ROCm device is available")
    return resolved


def load_model(path: str | Path, device: str | None = "auto", dtype: str = "float32") -> LoadedModel:
    """Load a GLM-5-architecture checkpoint (bf16 or MXFP4 weights) for generation."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    torch_device = resolve_device(device)
    with open_checkpoint(path) as checkpoint:
        model = build_model(checkpoint, torch_device, DTYPES[dtype])
    return LoadedModel(Path(path), model, load_tokenizer(Path(path)), Decoder(model))
