"""MTP acceptance on the bundled trained checkpoint: conversions keep it, broken conversions collapse it."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

from glm5conv import codec
from glm5conv.bundled import bundled_path
from glm5conv.checkpoint import open_checkpoint
from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from glm5conv.runtime import load_model
from tests.helpers import edit_shard, load_shard

TRAINED = bundled_path("tiny-glm5-trained")
EH = "model.layers.6.eh_proj.weight"


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """64-byte snippets of the standard library's source, the kind of text the model was trained on."""
    tokenizer = load_model(TRAINED, device="cpu").tokenizer
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "test" not in p.parts)
    rng = random.Random(1)
    out: list[list[int]] = []
    while len(out) < 6:
        data = rng.choice(files).read_bytes()
        if len(data) > 400:
            start = rng.randrange(0, len(data) - 200)
            out.append(tokenizer.encode(data[start : start + 64].decode("utf-8", "replace"))[:64])
    return out


def acceptance(path: Path, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    model = load_model(path, device="cpu")
    lengths, outputs = [], []
    for prompt in prompts:
        result = model.generate(prompt, 64, speculative_num_steps=3, stop_at_eos=False)
        lengths += result.accept_lengths
        outputs.append(result.token_ids)
    return sum(lengths) / len(lengths), outputs


def test_conversions_keep_acceptance(tmp_path: Path, prompts) -> None:
    base, base_tokens = acceptance(TRAINED, prompts)
    assert base >= 1.8  # the trained MTP layer drafts well (untrained: ~1.0)
    for to, scope in (("bf16", "eh-proj"), ("bf16", "mtp")):
        out = tmp_path / f"{to}-{scope}"
        convert(TRAINED, out, ConvertOptions(to=to, scope=scope))
        accept, tokens = acceptance(out, prompts)
        assert tokens == base_tokens and accept == base  # bit-exact dequantization: the very same decoding


@pytest.mark.parametrize("breakage", ["halves of eh_proj's input swapped", "nibbles swapped"])
def test_broken_conversions_collapse_acceptance(tmp_path: Path, prompts, breakage: str) -> None:
    out = tmp_path / "broken"
    convert(TRAINED, out, ConvertOptions())
    shard = next(p.name for p in out.glob("*.safetensors") if EH in load_shard(p)[0])
    weight = load_shard(out / shard)[0][EH]
    hidden = weight.shape[0]
    if breakage == "nibbles swapped":  # a converter that reads element 2k from the high nibble
        with open_checkpoint(TRAINED) as source:
            packed = source.read_tensor(EH).view(torch.uint8)
            scale = source.read_tensor(EH + "_scale").view(torch.uint8)
        broken = codec.decode(((packed >> 4) | (packed << 4)).to(torch.uint8), scale)
    else:  # [hnorm(h), enorm(e)] instead of [enorm(e), hnorm(h)]
        broken = torch.cat([weight[:, hidden:], weight[:, :hidden]], dim=1)
    edit_shard(out, shard, **{EH.replace(".", "__"): broken.contiguous()})
    accept, _ = acceptance(out, prompts)
    assert accept < 1.3, accept
