"""Decoding: plain autoregressive, and MTP speculative decoding as SGLang's EAGLE/NEXTN with topk 1.

Speculative round (``k`` = speculative_num_steps), main model cached up to position n-1, token x_n
chosen, MTP cached up to n-1 and its first draft d_1 ready:
  1. draft: chain the MTP layer k-1 more times on its own output -> d_1 .. d_k;
  2. verify: one main-model pass over [x_n, d_1 .. d_k] at positions n .. n+k;
  3. accept the longest prefix the main model agrees with plus one token from it (the bonus);
  4. "draft extend": rerun the MTP layer over the accepted tokens with the main model's true
     hidden states, which refreshes its cache and yields the next round's d_1.
Greedy: agree = argmax. Sampling: the standard speculative-sampling rule (accept d with
probability min(1, p(d)/q(d)), else sample from norm(max(p - q, 0))), which leaves the output
distribution that of the main model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm5conv.runtime.graphs import GraphSteps
from glm5conv.runtime.model import GLM5


@dataclass
class GenerateResult:
    token_ids: list[int]
    accept_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def mean_accept_length(self) -> float | None:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


class Sampler:
    """Greedy at temperature 0, else sampling from softmax(logits / T) with a private generator."""

    def __init__(self, temperature: float, device: torch.device, seed: int | None) -> None:
        self.temperature = temperature
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [...] token ids."""
        if self.greedy:
            return logits.argmax(-1)
        return self.sample_probs(self.probs(logits))

    def sample_probs(self, probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def uniform(self, device: torch.device) -> float:
        return float(torch.rand((), generator=self.generator, device=device))


class Decoder:
    """Runs generation on a GLM5 model, one request at a time (batch 1)."""

    def __init__(self, model: GLM5, cuda_graphs: bool | None = None, max_draft_steps: int = 4) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.max_draft_steps = max_draft_steps
        self.graphs: GraphSteps | None = None
        self._on_tokens: Callable[[list[int]], None] | None = None

    def _ensure_cache(self, length: int) -> None:
        if self.model.caches is None or self.model.max_len < length:
            # room to grow: every new allocation costs a recapture of the CUDA graphs
            self.model.setup_caches(1, max(length, 256 if self.device.type == "cpu" else 1024))
        if self.cuda_graphs and (self.graphs is None or not self.graphs.valid_for(self.model)):
            self.graphs = GraphSteps(self.model, self.max_draft_steps + 1)

    def _positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device)

    def main(self, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model over ``tokens`` [1, S] placed at positions start .. start+S-1."""
        count = tokens.shape[1]
        if self.graphs is not None and count in self.graphs.main:
            return self.graphs.main[count](tokens, self._positions(start, count))
        return self.model(tokens, self._positions(start, count), start + count)

    def draft(self, tokens: torch.Tensor, hidden: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = tokens.shape[1]
        if self.graphs is not None and count in self.graphs.draft:
            return self.graphs.draft[count](tokens, hidden, self._positions(start, count))
        return self.model.forward_mtp(tokens, hidden, self._positions(start, count), start + count)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        speculative_num_steps: int = 0,
        seed: int | None = None,
        stop_ids: tuple[int, ...] = (),
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerateResult:
        """``on_tokens`` is called with each batch of new tokens as soon as it is final (streaming)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if speculative_num_steps and self.model.mtp is None:
            raise ValueError("this checkpoint has no MTP layer: use speculative_num_steps=0")
        self._ensure_cache(len(prompt_ids) + max_new_tokens + speculative_num_steps + 2)
        sampler = Sampler(temperature, self.device, seed)
        self._on_tokens = on_tokens
        start = time.perf_counter()
        if speculative_num_steps:
            result = self._speculative(prompt_ids, max_new_tokens, sampler, speculative_num_steps, stop_ids)
        else:
            result = self._plain(prompt_ids, max_new_tokens, sampler, stop_ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.seconds = time.perf_counter() - start
        return result

    def _finish(self, result: GenerateResult, new: list[int], max_new_tokens: int, stop_ids: tuple[int, ...]) -> bool:
        """Append tokens up to a stop token or the length limit; True when generation is over."""
        before = len(result.token_ids)
        done = False
        for token in new:
            result.token_ids.append(token)
            if token in stop_ids:
                result.finish_reason = "stop"
                done = True
                break
            if len(result.token_ids) >= max_new_tokens:
                done = True
                break
        if self._on_tokens is not None and len(result.token_ids) > before:
            self._on_tokens(result.token_ids[before:])
        return done

    def _plain(self, prompt: list[int], max_new: int, sampler: Sampler, stop: tuple[int, ...]) -> GenerateResult:
        result = GenerateResult([])
        tokens = torch.tensor([prompt], device=self.device)
        logits, _ = self.main(tokens, 0)
        position = len(prompt)
        while True:
            token = sampler.sample(logits[0, -1])
            if self._finish(result, [int(token)], max_new, stop):
                return result
            logits, _ = self.main(token.view(1, 1), position)
            position += 1

    def _speculative(
        self, prompt: list[int], max_new: int, sampler: Sampler, steps: int, stop: tuple[int, ...]
    ) -> GenerateResult:
        result = GenerateResult([])
        n = len(prompt)
        logits, hidden = self.main(torch.tensor([prompt], device=self.device), 0)
        x_n = sampler.sample(logits[0, -1])
        if self._finish(result, [int(x_n)], max_new, stop):
            return result
        # draft extend over the prompt: pairs (x_{i+1}, h_i) at positions 0 .. n-1
        draft_in = torch.cat([torch.tensor(prompt[1:], device=self.device), x_n.view(1)])[None]
        d_logits, d_hidden = self.draft(draft_in, hidden, 0)
        while True:
            # 1. draft d_1 .. d_k
            drafts, draft_probs = [], []
            last_logits, last_hidden = d_logits[0, -1], d_hidden[:, -1:]
            for i in range(steps):
                draft_probs.append(None if sampler.greedy else sampler.probs(last_logits))
                token = last_logits.argmax(-1) if sampler.greedy else sampler.sample_probs(draft_probs[-1])
                drafts.append(token)
                if i + 1 < steps:
                    step_logits, last_hidden = self.draft(token.view(1, 1), last_hidden, n + i)
                    last_logits = step_logits[0, -1]
            # 2. verify [x_n, d_1 .. d_k] at positions n .. n+k
            verify_in = torch.stack([x_n, *drafts]).view(1, -1)
            v_logits, v_hidden = self.main(verify_in, n)
            # 3. accept
            accepted, bonus = self._accept(sampler, v_logits[0], drafts, draft_probs)
            emitted = [int(t) for t in drafts[:accepted]] + [int(bonus)]
            before = len(result.token_ids)
            done = self._finish(result, emitted, max_new, stop)
            result.accept_lengths.append(len(result.token_ids) - before)
            if done:
                return result
            # 4. draft extend with the true hidden states at positions n .. n+accepted
            extend_in = torch.stack([*drafts[:accepted], bonus]).view(1, -1)
            d_logits, d_hidden = self.draft(extend_in, v_hidden[:, : accepted + 1], n)
            n += accepted + 1
            x_n = bonus

    def _accept(
        self, sampler: Sampler, logits: torch.Tensor, drafts: list[torch.Tensor], draft_probs: list[torch.Tensor | None]
    ) -> tuple[int, torch.Tensor]:
        """(number of drafts accepted, the token that follows them) from the verify logits [k+1, V]."""
        if sampler.greedy:
            target = logits.argmax(-1)
            values = torch.cat([target, torch.stack(drafts)]).tolist()  # one host sync per round
            predicted, drafted = values[: len(drafts) + 1], values[len(drafts) + 1 :]
            accepted = next(
                (i for i, (p, d) in enumerate(zip(predicted[:-1], drafted, strict=True)) if p != d), len(drafts)
            )
            return accepted, target[accepted]
        p_all = sampler.probs(logits)
        for i, (token, q) in enumerate(zip(drafts, draft_probs, strict=True)):
            p = p_all[i]
            if sampler.uniform(self.device) * float(q[token]) < float(p[token]):
                continue
            residual = (p - q).clamp(min=0)
            residual = residual / residual.sum() if float(residual.sum()) > 0 else p
            return i, sampler.sample_probs(residual)
        return len(drafts), sampler.sample_probs(p_all[-1])
