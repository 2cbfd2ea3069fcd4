"""Reward-model score: the mean output of a sequence-classification reward model over (prompt, response).

Ye et al. (ICLR 2025) report the mean score of OpenAssistant/reward-model-deberta-v3-large-v2 on
AdvBench responses ("RM"). The model reads the pair as a text pair (question, answer), as in its
model card, and the score is the first logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsafe.errors import ConfigError


class RewardModel:
    """A sequence-classification reward model loaded from a hub id or local path."""

    def __init__(self, name: str, device: str = "auto", max_length: int = 512, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fedsafe.models import pick_device

        self.device = pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name).to(self.device).eval()
        except OSError as exc:
            raise ConfigError(f"eval.reward_model={name!r}: could not load it ({exc.__class__.__name__}); "
                              "give a local path when the hub is unreachable") from exc
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def from_parts(cls, model, tokenizer, max_length: int = 512, batch_size: int = 8) -> "RewardModel":
        """Wrap an already loaded model and tokenizer (tests, notebooks)."""
        obj = cls.__new__(cls)
        obj.model, obj.tokenizer = model.eval(), tokenizer
        obj.device = next(model.parameters()).device
        obj.max_length, obj.batch_size = max_length, batch_size
        return obj

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair: the first logit of the classifier."""
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[i: i + self.batch_size]), list(responses[i: i + self.batch_size]),
                                 return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits
            out.extend(logits[:, 0].float().tolist())
        return out

    def mean_score(self, prompts: Sequence[str], responses: Sequence[str]) -> float:
        """The RM metric: mean score over the pairs."""
        s = self.scores(prompts, responses)
        return sum(s) / len(s) if s else float("nan")
