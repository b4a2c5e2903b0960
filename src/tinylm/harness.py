"""EleutherAI LM Evaluation Harness support: scoring helpers, and a `tinylm` model for the harness.

    tinylm harness runs/mini-gpt --tasks hellaswag --limit 100      # or, in Python:
    tinylm.harness.evaluate("runs/mini-gpt", ["hellaswag"], limit=100)
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

from tinylm.errors import TinyLMError
from tinylm.generate import generate
from tinylm.hub import offline_reason

WINDOWS_PER_PASS = 64  # context windows scored together when a continuation runs past the context


@torch.no_grad()
def continuation_logprob(model: nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether greedy decoding would produce exactly the continuation.

    Each continuation token is scored after the (at most block_size) tokens before it: in one forward pass
    when the context and continuation fit the context window, else one window per token past it, in batches.
    """
    block, n = model.cfg.block_size, len(continuation)
    if not context or not continuation:
        raise TinyLMError(
            "Scoring a continuation needs at least one context token and one continuation token."
        )
    tokens = (context + continuation)[-(block + n) :]  # every token any window can see
    device = next(model.parameters()).device
    first = len(tokens) - n  # index of the first continuation token in `tokens`
    head = tokens[: min(len(tokens) - 1, block)]  # the first window: targets up to index block
    logits = [model(torch.tensor([head], device=device))[0, first - 1 :].float()]  # (targets in head, V)
    if len(tokens) - 1 > block:  # targets past the first window: the block tokens before each
        later = torch.tensor(tokens, device=device).unfold(0, block, 1)[1 : len(tokens) - block]  # (m, block)
        logits += [model(batch)[:, -1].float() for batch in later.split(WINDOWS_PER_PASS)]
    logprobs = F.log_softmax(torch.cat(logits), dim=-1)  # (n, V)
    target = torch.tensor(continuation, device=device)
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

            offline_reason()  # offline, task datasets then load from the cache at once instead of retrying

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


def evaluate(
    run: str, tasks: list[str], limit: int | None = None, device: str = "cpu", checkpoint: str = "last"
) -> dict[str, dict[str, float]]:
    """Run harness `tasks` on a tinylm run: {task: {metric: value}}; offline, uncached tasks fail at once."""
    try:
        import lm_eval
    except ImportError:
        raise TinyLMError("The evaluation harness needs lm_eval: pip install 'tinylm[eval]'.") from None
    offline = offline_reason()  # before any dataset download: offline mode means no retries
    try:
        results = lm_eval.simple_evaluate(
            model="tinylm",
            model_args=f"run={run},checkpoint={checkpoint},device={device}",
            tasks=tasks,
            limit=limit,
        )
    except TinyLMError:
        raise
    except Exception as exc:  # no network, unknown task, a dataset that fails to load
        if offline:
            raise TinyLMError(
                f"Harness task(s) {', '.join(tasks)} could not be loaded: {offline} and their data is not in "
                "the local Hugging Face cache; connect to the network once (downloads are cached)."
            ) from None
        raise TinyLMError(
            f"The harness failed on {', '.join(tasks)} ({type(exc).__name__}: {str(exc)[:200]})."
        ) from None
    return {
        task: {k: v for k, v in m.items() if isinstance(v, float)} for task, m in results["results"].items()
    }
