"""The runtime on a CUDA/ROCm device (skipped, with the reason shown, where there is none)."""

from __future__ import annotations

import pytest

from glm5conv.bundled import bundled_path
from glm5conv.runtime import load_model
from glm5conv.runtime.generate import Decoder

pytestmark = pytest.mark.gpu


def test_graphs_match_eager_and_cpu_in_float32() -> None:
    prompt = list(range(40, 80))
    cpu = load_model(bundled_path("tiny-glm5-trained"), device="cpu").generate(prompt, 48, speculative_num_steps=3)
    gpu = load_model(bundled_path("tiny-glm5-trained"), device="cuda", dtype="float32")
    graphed = gpu.generate(prompt, 48, speculative_num_steps=3)
    eager = Decoder(gpu.model, cuda_graphs=False).generate(prompt, 48, speculative_num_steps=3, stop_ids=(1,))
    assert graphed.token_ids == eager.token_ids == cpu.token_ids
    assert graphed.accept_lengths == cpu.accept_lengths


def test_speculative_equals_plain_with_graphs_in_bfloat16() -> None:
    model = load_model(bundled_path("tiny-glm5-trained"), device="cuda", dtype="bfloat16")
    for start in (10, 60, 120):
        prompt = list(range(start, start + 32))
        assert model.generate(prompt, 64, speculative_num_steps=2).token_ids == model.generate(prompt, 64).token_ids
