"""EleutherAI LM Evaluation Harness support: scoring helpers, and a `tinylm` model for the harness.

    import lm_eval, tinylm.harness                 # registers the "tinylm" model
    lm_eval.simple_evaluate(model="tinylm", model_args="run=runs/mini-gpt", tasks=["lambada_openai"])

or export first and use the harness's own `hf` model:
    tinylm export runs/mini-gpt --format hf --out hf/mini-gpt
    lm_eval --model hf --model_args pretrained=hf/mini-gpt --tasks lambada_openai
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.generate import generate


@torch.no_grad()
def continuation_logprob(model: nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether greedy decoding would produce exactly the continuation."""
    tokens = (context + continuation)[-(model.cfg.block_size + 1) :]
    n = len(continuation)
    device = next(model.parameters()).device
    x = torch.tensor([tokens[:-1]], device=device)
    logprobs = F.log_softmax(model(x)[0, -n:].float(), dim=-1)  # (n, V)
    target = torch.tensor(tokens[-n:], device=device)
    score = logprobs.gather(-1, target[:, None]).sum().item()
    return score, bool((logprobs.argmax(-1) == target).all())


@torch.no_grad()
def rolling_logprob(model: nn.Module, tokens: list[int], start_token: int) -> float:
    """Total log-likelihood of a whole text, scored in non-overlapping windows after a start token."""
    from tinylm.evaluate import evaluate_tokens

    if not tokens:
        return 0.0
    result = evaluate_tokens(model, [start_token] + tokens, block_size=model.cfg.block_size)
    return -result.nll


def _make_harness_model() -> type | None:
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        return None

    @register_model("tinylm")
    class TinyLMEval(LM):
        """A tinylm run as a harness model: model_args="run=RUN_DIR[,checkpoint=best][,device=cuda]"."""

        def __init__(
            self, run: str, checkpoint: str = "last", device: str = "cpu", max_gen_toks: int = 128, **_: Any
        ) -> None:
            super().__init__()
            from tinylm.checkpoint import load_run

            loaded = load_run(run, checkpoint, device)
            self.model, self.tok = loaded.model, loaded.tokenizer
            self.max_gen_toks = int(max_gen_toks)

        def _encode(self, text: str) -> list[int]:
            return self.tok.encode(text) if text else []

        def _start(self) -> int:
            return self.tok.eot_id if self.tok.eot_id is not None else 0

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            out = []
            for req in requests:
                context, continuation = req.args
                ctx = self._encode(context) or [self._start()]
                out.append(continuation_logprob(self.model, ctx, self._encode(continuation)))
            return out

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            return [rolling_logprob(self.model, self._encode(req.args[0]), self._start()) for req in requests]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                text = generate(
                    self.model,
                    self.tok,
                    context,
                    max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                    do_sample=bool(kwargs.get("do_sample", False)),
                    temperature=float(kwargs.get("temperature", 1.0)) or 1.0,
                    stop=[until] if isinstance(until, str) else list(until),
                )[0].text
                out.append(text)
            return out

    return TinyLMEval


TinyLMEval = _make_harness_model()  # None when lm_eval is not installed
