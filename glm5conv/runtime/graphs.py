"""CUDA graphs of the fixed-shape decode steps (all of them on CUDA/ROCm; none on CPU).

A tiny model's decode step is hundreds of small kernels, so launch overhead, not arithmetic or
memory, sets its speed. Every step after the prefill has one of a few shapes - main model over 1
token (plain decode) or k+1 tokens (verify), MTP layer over 1 (draft) or 1..k+1 tokens (extend) -
and attends over the whole static cache with a validity mask, so each shape is captured once and
replayed with its inputs copied into static buffers.
"""

from __future__ import annotations

import torch

from glm5conv.runtime.model import GLM5


class _Graph:
    def __init__(self, fn, inputs: list[torch.Tensor], pool) -> None:
        self.inputs = inputs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs (lazy allocations) outside the capture
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*inputs)

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, value in zip(self.inputs, values, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.outputs


class GraphSteps:
    """Captured main and draft steps for token counts 1 .. max_tokens over ``model``'s current caches."""

    def __init__(self, model: GLM5, max_tokens: int) -> None:
        self.model = model
        self.caches_id = id(model.caches)
        device = model.lm_head.weight.device
        hidden = model.args.hidden_size
        pool = torch.cuda.graph_pool_handle()
        self.main: dict[int, _Graph] = {}
        self.draft: dict[int, _Graph] = {}
        # warm-up and capture write cache slot 0 .. n-1: harmless, captured before any prefill
        for n in range(1, max_tokens + 1):
            tokens = torch.zeros(1, n, dtype=torch.int64, device=device)
            positions = torch.arange(n, device=device)
            self.main[n] = _Graph(lambda t, p: model(t, p, None), [tokens, positions], pool)
            if model.mtp is not None:
                h = torch.zeros(1, n, hidden, dtype=model.lm_head.weight.dtype, device=device)
                self.draft[n] = _Graph(
                    lambda t, x, p: model.forward_mtp(t, x, p, None), [tokens.clone(), h, positions.clone()], pool
                )

    def valid_for(self, model: GLM5) -> bool:
        return id(model.caches) == self.caches_id
