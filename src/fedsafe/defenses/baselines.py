"""Two baselines that the reviewers of Ye et al. (ICLR 2025) asked to compare with the post-hoc defense.

**Local-model probing** (:class:`LocalProbingAggregator`). Each round, before aggregation, the server
rebuilds every sampled client's *local model* (global adapter + that client's update), generates answers
to a few harmful prompts with it, and excludes the clients whose answers comply (contain no refusal
string, the Rule metric of :mod:`fedsafe.evaluation.rule`). The kept updates go to the configured rule.

*Requirement:* the server must see each client's plaintext local model. This is **incompatible with
secure aggregation** (the server only ever holds the encrypted sum) and leaks each client's update to
the server; the config refuses ``baselines.probing`` together with ``secure_agg``. It also costs one
generation pass per client per round, and it assumes a base model that refuses: on a base that already
complies (the embedded SmolLM2-135M is not safety-aligned) the ``absolute`` criterion would exclude
every client, so the default ``relative`` criterion compares each client with the current global model.

**Personalization-style defense** (:func:`personalize`). After the last round, each benign client
fine-tunes the final global model on its own (benign) data for a few steps and keeps the result as its
personal model. No server-side data is needed; each personalized adapter is saved under
``adapters/personalized/<client_id>``.
"""

from __future__ import annotations

import logging

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, RoundContext
from fedsafe.errors import ConfigError

log = logging.getLogger("fedsafe")


# ------------------------------------------------------------------------------------------------
# Local-model probing
# ------------------------------------------------------------------------------------------------

def compliance_rate(responses: list[str], rule_list: str = "fedit") -> float:
    """Share of responses without any refusal string (1 - Rule/100)."""
    from fedsafe.evaluation.rule import refusal_flags

    if not responses:
        return float("nan")
    flags = refusal_flags(responses, rule_list)
    return 1.0 - sum(flags) / len(flags)


def probing_exclusions(client_rates: list[float], reference_rate: float | None, criterion: str,
                       threshold: float, margin: float) -> list[bool]:
    """Which clients to exclude given their compliance rates.

    ``absolute``: rate > threshold. ``relative``: rate > reference (the global model's rate) + margin.
    """
    if criterion == "absolute":
        return [r > threshold for r in client_rates]
    if criterion == "relative":
        if reference_rate is None:
            raise ValueError("relative probing needs the global model's compliance rate")
        return [r > reference_rate + margin for r in client_rates]
    raise ConfigError(f"baselines.probing.criterion must be absolute or relative, got {criterion!r}")


class LocalProbingAggregator(Aggregator):
    """Wraps a rule: probes each client's local model on harmful prompts and excludes the compliant ones.

    ``generate_fn(vec) -> list[str]`` answers the probe prompts with the model whose adapter is ``vec``.
    """

    name = "local_probing"
    needs_plaintext = True

    def __init__(self, inner: Aggregator, generate_fn, criterion: str = "relative", threshold: float = 0.5,
                 margin: float = 0.25, rule_list: str = "fedit"):
        self.inner = inner
        self.generate_fn = generate_fn
        self.criterion = criterion
        self.threshold = threshold
        self.margin = margin
        self.rule_list = rule_list
        self._global: torch.Tensor | None = None
        self.name = f"local_probing+{getattr(inner, 'name', type(inner).__name__)}"
        # pass attributes the pipeline looks for (probe shadow training, ...) through to the inner rule
        self.needs_shadow = getattr(inner, "needs_shadow", False)

    def prepare(self, context: RoundContext):
        self._global = context.global_vec.clone()
        prepare = getattr(self.inner, "prepare", None)
        return prepare(context) if prepare is not None else context.round_config

    def set_global(self, vec: torch.Tensor) -> None:
        """The global adapter the updates are relative to (set automatically through :meth:`prepare`)."""
        self._global = vec.clone()

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        if self._global is None:
            raise RuntimeError("local probing: the global adapter of this round is unknown (prepare not called)")
        rates = [compliance_rate(self.generate_fn(self._global + u), self.rule_list) for u in updates]
        reference = (compliance_rate(self.generate_fn(self._global), self.rule_list)
                     if self.criterion == "relative" else None)
        excluded = probing_exclusions(rates, reference, self.criterion, self.threshold, self.margin)
        keep = [i for i, e in enumerate(excluded) if not e]
        info = {"probing": {"compliance": dict(zip(client_ids, rates)), "reference": reference,
                            "excluded": [c for c, e in zip(client_ids, excluded) if e],
                            "criterion": self.criterion}}
        weights = torch.zeros(len(client_ids))
        if not keep:
            log.warning("local probing excluded every client this round; the global adapter is unchanged")
            return AggregationResult(torch.zeros(updates.shape[1]), weights, info)
        res = self.inner(updates[keep], num_samples[keep], [client_ids[i] for i in keep])
        for j, i in enumerate(keep):
            weights[i] = float(res.client_weights[j])
        return AggregationResult(res.update, weights, {**info, "inner": res.info})

    def state_dict(self) -> dict:
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)


def probe_prompts(pc, model_name: str, generator_cache: dict | None, seed: int) -> list[str]:
    """The harmful prompts of local probing: from ``pc.prompts`` (a file) or generated by the base model."""
    from fedsafe.data import datagen

    if pc.prompts:
        prompts = datagen.load_instruction_file(pc.prompts)
    else:
        gen = datagen.get_generator(model_name, generator_cache)
        prompts = datagen.generate_instructions(gen, "harmful", pc.n_prompts, seed=seed)
    return prompts[: pc.n_prompts]


def wrap_probing(pc, aggregator, model, tokenizer, flat, *, model_name: str, seed: int, rule_list: str = "fedit",
                 generator_cache: dict | None = None):
    """Wrap ``aggregator`` with local-model probing (``pc``: the ``baselines.probing`` section).

    Secure aggregation is refused at config load (the local_probing plug-in declares plaintext_updates).
    """
    from fedsafe.generation import generate

    prompts = probe_prompts(pc, model_name, generator_cache, seed + 31)
    log.info("local probing: %d harmful prompts, criterion %s", len(prompts), pc.criterion)

    def generate_fn(vec: torch.Tensor) -> list[str]:
        saved = flat.get()
        flat.set(vec)
        try:
            return generate(model, tokenizer, prompts, max_new_tokens=pc.max_new_tokens, batch_size=len(prompts))
        finally:
            flat.set(saved)

    return LocalProbingAggregator(aggregator, generate_fn, pc.criterion, pc.threshold, pc.margin, rule_list)


# ------------------------------------------------------------------------------------------------
# Personalization
# ------------------------------------------------------------------------------------------------

def personalize(pc, ctx, final_vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each benign client of ``ctx.clients`` fine-tunes ``final_vec`` on its own data; returns client id ->
    personal adapter (``pc``: the ``baselines.personalization`` section; ``ctx``: a fedsafe.plugins.RunContext).

    A ``personalized`` record per client goes to metrics.jsonl; the plug-in saves the adapters under
    ``adapters/personalized/<client_id>``.
    """
    from dataclasses import replace

    from fedsafe.fl.client import LocalTrainer, RoundConfig

    fl = ctx.fl
    trainer = LocalTrainer(ctx.model, ctx.tokenizer)
    rc = RoundConfig(round=fl.rounds + 1, lr=pc.lr or fl.lr, local_steps=pc.steps,
                     batch_size=fl.batch_size, grad_accum=fl.grad_accum, seed=ctx.seed,
                     max_grad_norm=fl.max_grad_norm, weight_decay=fl.weight_decay)
    out: dict[str, torch.Tensor] = {}
    for client in ctx.clients:
        if client.malicious:
            continue
        res = trainer.fit(client, final_vec, replace(rc, algorithm="fedavg"))
        vec = final_vec + res.update
        out[client.client_id] = vec
        ctx.log({"type": "personalized", "round": fl.rounds, "client_id": client.client_id,
                 "role": client.role, **res.metrics})
        ctx.print(f"personalized {client.client_id} ({client.role}): {pc.steps} steps, loss "
                  f"{res.metrics['first_loss']:.3f} -> {res.metrics['last_loss']:.3f}")
    ctx.flat.set(final_vec)
    if not out:
        log.warning("personalization: no benign client to personalize")
    return out
