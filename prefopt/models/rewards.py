"""Reward sources for PPO: anything that maps (prompt, response) to a scalar.

A PPO score function takes the policy's token ids: ``score_fn(prompt_ids, response_ids) -> (B,) tensor``.
The trained reward model on the shared base scores token ids directly (the fast path, same tokenizer); every
other source scores *text*, so the policy's tokens are decoded and handed over — a gold judge (the DPO paper's
"PPO-GT"), a plain Python function, or a sequence classifier with a tokenizer of its own, which re-tokenises.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from prefopt.models.base import ModelError

TextScorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def text_score_fn(score_text: TextScorer, tokenizer, *, name: str = "reward"):
    """Wrap a text scorer ``(prompts, responses) -> scores`` as a token-id score function for PPO."""

    def score_fn(prompt_ids, response_ids) -> torch.Tensor:
        prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        scores = [float(s) for s in score_text(prompts, responses)]
        if len(scores) != len(responses):
            raise ValueError(f"reward source {name!r} returned {len(scores)} scores for {len(responses)} responses")
        bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
        if bad is not None:
            raise ValueError(f"reward source {name!r} returned a non-finite score for response {bad}")
        return torch.tensor(scores, dtype=torch.float32)

    return score_fn


class SequenceClassifierReward:
    """A reward model with its own tokenizer (hub id or local dir): scores ``prompt + response`` text.

    Two-label classifiers (e.g. sentiment) score the logit of ``label`` (default: the last label, the
    "positive" one in the usual NEGATIVE/POSITIVE order); single-output models score their one logit.
    """

    def __init__(self, model, tokenizer, *, label: int | None = None, batch_size: int = 32, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        n_labels = model.config.num_labels
        self.label = (n_labels - 1) if label is None else label
        if not 0 <= self.label < n_labels:
            raise ValueError(f"label {label} out of range for a model with {n_labels} labels")
        self.batch_size, self.max_length = batch_size, max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = getattr(model.config, "_name_or_path", "classifier")

    @classmethod
    def load(cls, name_or_path: str, **kwargs) -> "SequenceClassifierReward":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"could not load reward model '{name_or_path}' ({first}): needs internet or a local path") from None
        return cls(model, tok, **kwargs)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        out: list[float] = []
        texts = [p + r for p, r in zip(prompts, responses)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length).to(device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            out += logits[:, self.label].cpu().tolist()
        return out
