"""Training-data extraction by a participating client that sees only the global model of each round.

Follows the threat model and attacks of Guo et al., "Can Federated Learning Safeguard Private Data in
LLM Training? Vulnerabilities, Attacks, and Defense Evaluation" (Findings of EMNLP 2025):

- **zero-input generation**: sample N sequences from the BOS token with top-p and temperature;
- **partial-input completion**: feed the first x% (30%, 80%) of a victim's training sample, complete it;
- **multi-round tracking**: the attacker keeps the global adapters it receives and samples from the
  contrast of rounds t and t-k. The paper's exact formula is not available to us; we implement the form
  given in our issue, in logit space ``z = z_t + alpha * (z_t - z_{t-k})`` (two adapters on the one
  in-memory model: theta_t is loaded, theta_{t-k} is substituted with ``torch.func.functional_call``, each
  with its own KV cache) and in parameter space ``theta_t + alpha * (theta_t - theta_{t-k})`` on the flat
  LoRA vector (A and B factors extrapolated separately, so the implied weight change is not linear in alpha);
- **loss-based membership inference** (Yeom et al., CSF 2018): AUC of -loss on members vs held-out samples,
  plus the reference-calibrated score loss - loss_base (Carlini et al., USENIX Security 2021). Members (and
  the samples completed by the partial-input attack) are drawn only from the victim examples that were
  actually trained on by round t, in an update the rule kept (the ``seen_examples`` each client reports);
  a client's data holds many examples its few local steps never reach, and those are not members;
- **canaries** (Carlini et al., "The Secret Sharer", USENIX Security 2019): seeded random secrets in a
  fixed format are inserted into victims' data; we report each secret's exact extraction rate and its
  exposure = log2(M+1) - log2(rank), the rank of the true secret's log-perplexity among M random candidates
  plus itself (bounded by log2(M+1)), and the skew-normal extrapolation of Carlini et al. (Sec. 4.3),
  -log2 CDF(log-perplexity of the secret), bounded by log2 |R|.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from fedsafe.data.format import IGNORE_INDEX, TokenizedExample, collate, format_example
from fedsafe.evaluation import leakage as lk
from fedsafe.progress import track

log = logging.getLogger("fedsafe")

VARIANTS = ("plain", "logit_contrast", "param_contrast")


# ------------------------------------------------------------------------------------------------
# Two adapters on one model: the loaded LoRA vector, and another substituted functionally
# ------------------------------------------------------------------------------------------------

def lora_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable (LoRA) parameters, in :class:`FlatLoRA` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_params(model: torch.nn.Module, flat, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{parameter name: tensor}`` of the LoRA vector ``vec``, for ``torch.func.functional_call``."""
    names = lora_param_names(model)
    out = {}
    for name, p, spec in zip(names, flat.params, flat.specs):
        out[name] = vec[spec.offset: spec.offset + spec.numel].view(spec.shape).to(p.device, p.dtype)
    return out


@dataclass
class LogitContrast:
    """Sample from ``z_t + alpha * (z_t - z_ref)``: ``params`` holds the reference (older) adapter."""

    params: dict[str, torch.Tensor]
    alpha: float


def _forward(model, params, **kwargs):
    if params is None:
        return model(**kwargs)
    return torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False)


def _contrasted_logits(model, contrast: LogitContrast | None, **kwargs) -> torch.Tensor:
    logits = model(**kwargs).logits.float()
    if contrast is None:
        return logits
    ref = _forward(model, contrast.params, **kwargs).logits.float()
    return logits + contrast.alpha * (logits - ref)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass before it already reaches top_p (the first token always stays)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_sequences(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
                     eos_id: int | None, greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0, batch_size: int = 16, contrast: LogitContrast | None = None,
                     progress: bool = False, description: str = "sampling") -> list[list[int]]:
    """Sample continuations of token-id prompts (left-padded, KV-cached); optional logit contrast.

    With ``contrast`` each step runs the loaded adapter and the reference adapter, each with its own KV
    cache, and samples from ``z + alpha (z - z_ref)``. Returns the new tokens of each prompt, cut at EOS.
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    iterator = track(batches, description) if progress else batches
    try:
        for batch in iterator:
            length = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, i in enumerate(batch):
                p = list(prompts[i])
                ids[row, length - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, length - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            caches = [None, None]
            done = torch.zeros(len(batch), dtype=torch.bool, device=device)
            step_ids = ids
            step_pos = pos
            new = []
            for _ in range(max_new_tokens):
                kwargs = dict(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True)
                out = model(**kwargs, past_key_values=caches[0])
                caches[0] = out.past_key_values
                z = out.logits[:, -1].float()
                if contrast is not None:
                    ref = _forward(model, contrast.params, **kwargs, past_key_values=caches[1])
                    caches[1] = ref.past_key_values
                    z = z + contrast.alpha * (z - ref.logits[:, -1].float())
                if greedy:
                    nxt = z.argmax(-1)
                else:
                    z = top_p_filter(z / temperature, top_p)
                    probs = torch.softmax(z, dim=-1).cpu()
                    nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                new.append(nxt)
                if eos_id is not None:
                    done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step_pos = step_pos[:, -1:] + 1
            tokens = torch.stack(new, dim=1).tolist()
            for row, i in enumerate(batch):
                seq = tokens[row]
                if eos_id is not None and eos_id in seq:
                    seq = seq[: seq.index(eos_id)]
                outputs[i] = seq
    finally:
        if was_training:
            model.train()
    return outputs


@torch.no_grad()
def sequence_nll(model, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int = 16,
                 contrast: LogitContrast | None = None) -> list[tuple[float, int]]:
    """(summed NLL, token count) over each example's labelled tokens; optional logit contrast."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    try:
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[s: s + batch_size]), pad_id).items()}
            logits = _contrasted_logits(model, contrast, input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"])
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                    ignore_index=IGNORE_INDEX, reduction="none")
            valid = labels != IGNORE_INDEX
            for row in range(nll.shape[0]):
                out.append((float(nll[row][valid[row]].sum()), int(valid[row].sum())))
    finally:
        if was_training:
            model.train()
    return out


# ------------------------------------------------------------------------------------------------
# The attacks
# ------------------------------------------------------------------------------------------------

def _bos(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no BOS, EOS or pad token to start zero-input generation from")


def zero_input_attack(model, tokenizer, n: int, *, max_new_tokens: int = 64, temperature: float = 1.0,
                      top_p: float = 0.95, seed: int = 0, batch_size: int = 16,
                      contrast: LogitContrast | None = None, progress: bool = False) -> list[str]:
    """Zero-input generation: ``n`` sequences sampled from the BOS token alone."""
    ids = sample_sequences(model, [[_bos(tokenizer)]] * n, max_new_tokens=max_new_tokens,
                           pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                           contrast=contrast, progress=progress, description="zero-input attack")
    return [tokenizer.decode(s, skip_special_tokens=True) for s in ids]


@dataclass
class Completion:
    """A partial-input completion: the prefix given, the model's continuation and the true suffix."""

    prefix: str
    completion: str
    target: str


def partial_input_attack(model, tokenizer, samples: Sequence[Sequence[int]], fraction: float, *,
                         greedy: bool = True, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                         batch_size: int = 16, max_new_tokens: int | None = None,
                         contrast: LogitContrast | None = None, progress: bool = False) -> list[Completion]:
    """Partial-input completion: feed the first ``fraction`` of each sample's tokens, generate the rest."""
    if not 0 < fraction < 1:
        raise ValueError(f"prefix fraction must be in (0, 1), got {fraction}")
    prefixes, targets = [], []
    for s in samples:
        s = list(s)
        cut = max(1, min(len(s) - 1, math.ceil(fraction * len(s))))
        prefixes.append(s[:cut])
        targets.append(s[cut:])
    longest = max(len(t) for t in targets)
    ids = sample_sequences(model, prefixes, max_new_tokens=max_new_tokens or longest,
                           pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, greedy=greedy,
                           temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                           contrast=contrast, progress=progress, description=f"completing {fraction:.0%} prefixes")
    out = []
    for p, c, t in zip(prefixes, ids, targets):
        # compare like with like: the continuation is cut to the true suffix's length in tokens
        out.append(Completion(tokenizer.decode(p, skip_special_tokens=True),
                              tokenizer.decode(c[: len(t)], skip_special_tokens=True),
                              tokenizer.decode(t, skip_special_tokens=True)))
    return out


def membership_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """AUC of "member" scores vs "non-member" scores (higher = more likely a member); ties count 1/2."""
    if not member_scores or not nonmember_scores:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    y = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(y, list(member_scores) + list(nonmember_scores)))


def membership_inference(model, members: Sequence[TokenizedExample], nonmembers: Sequence[TokenizedExample],
                         pad_id: int, *, batch_size: int = 16, contrast: LogitContrast | None = None,
                         reference: bool = True) -> dict:
    """Loss-based membership inference: AUC of -mean loss, and of -(loss - base-model loss) when asked."""
    def mean_losses(contrast_):
        return [s / max(n, 1) for s, n in sequence_nll(model, list(members) + list(nonmembers), pad_id,
                                                         batch_size, contrast_)]

    losses = mean_losses(contrast)
    m = len(members)
    out = {"auc": membership_auc([-x for x in losses[:m]], [-x for x in losses[m:]]),
           "member_loss": sum(losses[:m]) / max(m, 1),
           "nonmember_loss": sum(losses[m:]) / max(len(losses) - m, 1), "n_members": m,
           "n_nonmembers": len(losses) - m}
    if reference and hasattr(model, "disable_adapter"):
        with model.disable_adapter():  # the base model: calibrates for how "easy" each text is
            base = [s / max(n, 1) for s, n in sequence_nll(model, list(members) + list(nonmembers), pad_id,
                                                            batch_size)]
        cal = [b - x for x, b in zip(losses, base)]
        out["auc_ref"] = membership_auc(cal[:m], cal[m:])
    return out


# ------------------------------------------------------------------------------------------------
# Canaries
# ------------------------------------------------------------------------------------------------

_SYLLABLES = ("ka", "lo", "mi", "ren", "ta", "vo", "shi", "bel", "dar", "nu", "qui", "zor", "pel", "fa",
              "gri", "mon", "sel", "tav", "ul", "ex", "yan", "bro", "cel", "dun")


@dataclass
class Canary:
    """A made-up person and a random secret in a fixed format, inserted into one victim's data."""

    name: str
    secret: str
    instruction: str
    prefix: str  # the response text before the secret (what the attacker knows)
    suffix: str  # the response text after it
    client_id: str | None = None

    @property
    def response(self) -> str:
        return self.prefix + self.secret + self.suffix

    def with_secret(self, secret: str) -> str:
        return self.prefix + secret + self.suffix


def make_canaries(n: int, digits: int, seed: int, instruction: str = "What is the account number of {name}?",
                  template: str = "The account number of {name} is {secret}.") -> list[Canary]:
    """``n`` canaries with seeded made-up names and uniformly random ``digits``-digit secrets."""
    rng = random.Random(seed)
    out, names = [], set()
    while len(out) < n:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        secret = "".join(rng.choice("0123456789") for _ in range(digits))
        before, after = template.split("{secret}", 1)
        out.append(Canary(name, secret, instruction.format(name=name), before.format(name=name),
                          after.format(name=name)))
    return out


def inject_canaries(canaries: list[Canary], clients, tokenizer, repeats: int, max_length: int,
                    system: str | None = None) -> None:
    """Append ``repeats`` copies of each canary to a victim client's examples (round-robin over clients)."""
    if not clients:
        raise ValueError("no victim client to insert canaries into")
    for i, c in enumerate(canaries):
        client = clients[i % len(clients)]
        ex = format_example(tokenizer, c.instruction, c.response, max_length, system)
        full = format_example(tokenizer, c.instruction, c.response, 1 << 20, system)
        if ex is None or len(ex.input_ids) < len(full.input_ids):
            from fedsafe.errors import ConfigError

            raise ConfigError(f"privacy.canaries: a canary needs {len(full.input_ids)} tokens but "
                              f"data.max_length={max_length} truncates it (its secret would not be trained on)")
        client.examples.extend([ex] * repeats)
        c.client_id = client.client_id


def _prompt_ids(tokenizer, instruction: str, response_prefix: str, system: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": instruction}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + response_prefix, add_special_tokens=False)["input_ids"]


def canary_exposure(model, tokenizer, canary: Canary, *, n_candidates: int, digits: int, seed: int,
                    max_length: int = 512, system: str | None = None, batch_size: int = 32,
                    contrast: LogitContrast | None = None) -> dict:
    """Exposure of one canary (Secret Sharer): rank of its log-perplexity among random candidates."""
    rng = random.Random(seed)
    cands: set[str] = set()
    while len(cands) < n_candidates:
        s = "".join(rng.choice("0123456789") for _ in range(digits))
        if s != canary.secret:
            cands.add(s)
    secrets = [canary.secret, *sorted(cands)]
    examples = [format_example(tokenizer, canary.instruction, canary.with_secret(s), max_length, system)
                for s in secrets]
    nll = [s for s, _ in sequence_nll(model, examples, tokenizer.pad_token_id, batch_size, contrast)]
    mine, others = nll[0], nll[1:]
    lower = sum(o < mine for o in others) + 0.5 * sum(o == mine for o in others)
    rank = 1 + lower
    space = digits * math.log2(10)
    out = {"secret_nll": mine, "rank": rank, "exposure": math.log2(len(secrets)) - math.log2(rank),
           "exposure_max": math.log2(len(secrets)), "space_bits": space}
    out["exposure_extrapolated"] = _skewnorm_exposure(others, mine, space)
    return out


def _skewnorm_exposure(others: list[float], mine: float, cap: float) -> float | None:
    # Carlini et al. (2019), Sec. 4.3: fit a skew-normal to candidate log-perplexities, exposure = -log2 CDF
    try:
        from scipy.stats import skewnorm
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return None
    import warnings

    if len(set(others)) < 3:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, loc, scale = skewnorm.fit(others)
            logcdf = float(skewnorm.logcdf(mine, a, loc, scale))
    except Exception:  # the fit can fail on degenerate candidate sets; the rank exposure still stands
        return None
    if not math.isfinite(logcdf):
        return cap if logcdf < 0 else 0.0
    return float(min(cap, max(0.0, -logcdf / math.log(2))))


def canary_extraction(model, tokenizer, canary: Canary, *, n_samples: int, temperature: float, top_p: float,
                      seed: int, system: str | None = None, contrast: LogitContrast | None = None) -> dict:
    """Exact extraction rate: share of completions of the canary's prefix that reproduce the secret."""
    prompt = _prompt_ids(tokenizer, canary.instruction, canary.prefix.rstrip(), system)
    n_new = len(tokenizer(" " + canary.secret, add_special_tokens=False)["input_ids"]) + 2
    kw = dict(max_new_tokens=n_new, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
              contrast=contrast)
    greedy = sample_sequences(model, [prompt], greedy=True, **kw)[0]
    sampled = sample_sequences(model, [prompt] * n_samples, temperature=temperature, top_p=top_p, seed=seed,
                               batch_size=max(1, n_samples), **kw) if n_samples else []

    def hit(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip().startswith(canary.secret)

    return {"greedy_extracted": hit(greedy), "extraction_rate": (sum(hit(s) for s in sampled) / n_samples)
            if n_samples else float(hit(greedy))}


# ------------------------------------------------------------------------------------------------
# The attacker across rounds
# ------------------------------------------------------------------------------------------------

@dataclass
class AttackData:
    """What the attack is scored against: victims' examples, non-members and canaries (ground truth).

    ``victim_keys[i]`` is ``(client_id, index into that client's examples)`` of ``victims[i]``: what the
    clients' ``seen_examples`` reports refer to.
    """

    victims: list[TokenizedExample]
    nonmembers: list[TokenizedExample]
    canaries: list[Canary]
    victim_keys: list[tuple[str, int]] = field(default_factory=list)


class PrivacyAttacker:
    """A participating client that stores the global adapters it receives and attacks them.

    Runs every configured variant (plain, logit contrast, parameter contrast) of every attack on round t
    and returns (and writes) one result dict per variant. Uses the one in-memory PEFT model: the LoRA
    vector is swapped in with FlatLoRA and restored afterwards.
    """

    def __init__(self, pcfg, model, tokenizer, flat, init_vec: torch.Tensor, data: AttackData, run_dir=None,
                 progress: bool = True, *, seed: int = 0, max_length: int = 256, system_prompt: str | None = None):
        self.pcfg = pcfg  # the ``privacy`` section
        self.max_length = max_length  # data.max_length and data.system_prompt: how clients formatted their data
        self.system_prompt = system_prompt
        self.model = model
        self.tokenizer = tokenizer
        self.flat = flat
        self.data = data
        self.run_dir = run_dir
        self.progress = progress
        self.rounds: dict[int, torch.Tensor] = {0: init_vec.clone()}
        texts = [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in data.victims]
        self.index = lk.ReferenceIndex(texts)
        self.seed = self.pcfg.seed if self.pcfg.seed is not None else seed
        # without a run directory, the caller may set {(client_id, example index)} trained on (else: unknown)
        self.trained: set[tuple[str, int]] | None = None

    def trained_on(self, t: int) -> set[tuple[str, int]] | None:
        """``(client_id, example index)`` of the victim examples trained on in rounds 1..t, None when unknown.

        Read from the run's client records (``seen_examples``, reported by the local trainers); an update the
        rule dropped (aggregation weight 0) did not reach the global model, so its examples do not count.
        """
        if self.run_dir is None:
            return self.trained
        victims = {cid for cid, _ in self.data.victim_keys}
        out: set[tuple[str, int]] = set()
        for r in self.run_dir.records("client"):
            if r.get("round", 0) > t or r.get("client_id") not in victims:
                continue
            if "seen_examples" not in r:
                return None
            w = r.get("aggregation_weight")
            if w is not None and not w > 0:
                continue
            out.update((r["client_id"], int(i)) for i in r["seen_examples"])
        return out

    def member_pool(self, t: int) -> tuple[list[TokenizedExample], str]:
        """The victim examples members are drawn from at round ``t``, and where they come from.

        ``"trained_on"``: only examples trained on by round t. ``"all_victim_examples"`` (with a warning)
        when that is unknown: runs written before clients reported ``seen_examples``, or local DP-SGD with
        ``dp.secure_noise`` (its batches stay secret).
        """
        trained = self.trained_on(t) if self.data.victim_keys else None
        if trained is None:
            log.warning("privacy: the victim examples trained on are unknown (no seen_examples in the client "
                        "records); membership inference and partial-input completion draw from all victim "
                        "examples, many of which may never have been trained on")
            return list(self.data.victims), "all_victim_examples"
        return [e for e, key in zip(self.data.victims, self.data.victim_keys) if key in trained], "trained_on"

    def observe(self, round_no: int, vec: torch.Tensor) -> None:
        """Store the global adapter of ``round_no`` (only the last k+1 rounds and round 0 are kept)."""
        self.rounds[round_no] = vec.detach().clone()
        keep = {0} | {r for r in self.rounds if r > round_no - self.pcfg.k - 1}
        self.rounds = {r: v for r, v in self.rounds.items() if r in keep}

    def _round(self, t: int) -> torch.Tensor | None:
        # after a resume the attacker has not seen early rounds: read them from the run directory
        if t not in self.rounds and self.run_dir is not None and self.run_dir.adapter_dir(t).exists():
            from safetensors.torch import load_file

            state = load_file(str(self.run_dir.adapter_dir(t) / "adapter_model.safetensors"))
            self.rounds[t] = self.flat.from_state_dict(state)
        return self.rounds.get(t)

    def variants(self, t: int) -> list[tuple[str, torch.Tensor, LogitContrast | None]]:
        """(name, LoRA vector to load, logit contrast) for each configured variant at round ``t``."""
        theta_t = self._round(t)
        if theta_t is None:
            raise ValueError(f"privacy: the global adapter of round {t} was not observed and is not saved")
        ref_round = max(0, t - self.pcfg.k)
        theta_ref = self._round(ref_round)
        out = []
        for v in self.pcfg.variants:
            if v == "plain":
                out.append((v, theta_t, None))
            elif theta_ref is None:
                log.warning("privacy: round %d adapter is not available; skipping %s", ref_round, v)
            elif v == "logit_contrast":
                out.append((v, theta_t, LogitContrast(adapter_params(self.model, self.flat, theta_ref),
                                                      self.pcfg.alpha)))
            elif v == "param_contrast":
                out.append((v, theta_t + self.pcfg.alpha * (theta_t - theta_ref), None))
        return out

    def run(self, t: int) -> dict:
        """Run every attack variant on round ``t``; returns {variant: metrics} and logs/writes them."""
        p = self.pcfg
        saved = self.flat.get()
        tok = self.tokenizer
        seed = self.seed * 1_000_003 + t
        results: dict = {}
        data = self.data
        rng = random.Random(seed)
        pool, pool_kind = self.member_pool(t) if (p.n_mia or p.n_partial) else ([], "")
        if (p.n_mia or p.n_partial) and not pool:
            log.warning("privacy: no victim example was trained on by round %d (in an update the rule kept); "
                        "membership inference and partial-input completion are skipped", t)
        members = rng.sample(pool, min(p.n_mia, len(pool))) if p.n_mia else []
        nonmembers = data.nonmembers[: p.n_mia] if p.n_mia else []
        partial = rng.sample(pool, min(p.n_partial, len(pool))) if p.n_partial else []
        try:
            for name, vec, contrast in self.variants(t):
                t0 = time.perf_counter()
                self.flat.set(vec)
                res: dict = {}
                if p.n_zero_input:
                    gens = zero_input_attack(self.model, tok, p.n_zero_input, max_new_tokens=p.max_new_tokens,
                                             temperature=p.temperature, top_p=p.top_p, seed=seed,
                                             batch_size=p.batch_size, contrast=contrast, progress=self.progress)
                    rep = lk.leakage(gens, self.index, candidates=p.candidates, exhaustive=p.exhaustive)
                    res["zero_input"] = rep.summary
                    res["zero_input"]["canaries_in_generations"] = sum(
                        any(c.secret in g for g in gens) for c in data.canaries)
                    res["zero_input_examples"] = _top_examples(gens, rep, self.index)
                    if p.bertscore_model:
                        res["zero_input"]["bertscore_mean"] = _bertscore_best(gens, rep, self.index,
                                                                              p.bertscore_model)
                for frac in p.prefix_fractions if partial else []:
                    comps = partial_input_attack(self.model, tok, [e.input_ids.tolist() for e in partial], frac,
                                                 greedy=p.partial_greedy, temperature=p.temperature,
                                                 top_p=p.top_p, seed=seed, batch_size=p.batch_size,
                                                 contrast=contrast, progress=self.progress)
                    res[f"partial_{round(frac * 100)}"] = lk.pairwise([c.completion for c in comps],
                                                                      [c.target for c in comps])
                if members and nonmembers:
                    res["mia"] = membership_inference(self.model, members, nonmembers, tok.pad_token_id,
                                                      batch_size=p.batch_size, contrast=contrast,
                                                      reference=name == "plain")
                    res["mia"].update(member_pool=pool_kind, n_trained_on=len(pool))
                if data.canaries and p.canaries is not None:
                    per = []
                    for i, c in enumerate(data.canaries):
                        e = canary_exposure(self.model, tok, c, n_candidates=p.canaries.n_candidates,
                                            digits=p.canaries.digits, seed=seed + i,
                                            max_length=self.max_length,
                                            system=self.system_prompt, batch_size=max(p.batch_size, 32),
                                            contrast=contrast)
                        x = canary_extraction(self.model, tok, c, n_samples=p.canaries.n_samples,
                                              temperature=p.temperature, top_p=p.top_p, seed=seed + i,
                                              system=self.system_prompt, contrast=contrast)
                        per.append({"name": c.name, "client_id": c.client_id, **e, **x})
                    res["canaries"] = {
                        "exposure_mean": sum(c["exposure"] for c in per) / len(per),
                        "exposure_extrapolated_mean": _mean([c["exposure_extrapolated"] for c in per]),
                        "extraction_rate": sum(c["extraction_rate"] for c in per) / len(per),
                        "greedy_extracted": sum(c["greedy_extracted"] for c in per) / len(per),
                        "per_canary": per}
                res["seconds"] = time.perf_counter() - t0
                results[name] = res
        finally:
            self.flat.set(saved)
        self._write(t, results)
        return results

    def _write(self, t: int, results: dict) -> None:
        if self.run_dir is None:
            return
        from fedsafe.io import atomic_write_text

        p = self.pcfg
        payload = {"round": t, "k": p.k, "alpha": p.alpha, "variants": results}
        atomic_write_text(self.run_dir.path / "privacy" / f"round_{t:04d}.json",
                          json.dumps(payload, indent=2, default=str))
        for name, res in results.items():
            self.run_dir.log({"type": "privacy", "round": t, "variant": name, "k": p.k, "alpha": p.alpha,
                              **flatten_result(res)})


def flatten_result(res: dict) -> dict:
    """Headline numbers of one variant's result as flat keys (what metrics.jsonl and the table hold)."""
    out = {}
    z = res.get("zero_input")
    if z:
        out.update(zero_rougeL=z["rougeL_mean"], zero_rougeL_max=z["rougeL_max"], zero_exact=z["exact_rate"],
                   zero_near_exact=z["near_exact_rate"], zero_canaries=z.get("canaries_in_generations"),
                   zero_rougeL_lower_bound=z.get("lower_bound"))
        if "bertscore_mean" in z:
            out["zero_bertscore"] = z["bertscore_mean"]
    for key, val in res.items():
        if key.startswith("partial_"):
            pct = key.split("_")[1]
            out.update({f"partial{pct}_rougeL": val["rougeL_mean"], f"partial{pct}_exact": val["exact_rate"],
                        f"partial{pct}_near_exact": val["near_exact_rate"]})
    if "mia" in res:
        out["mia_auc"] = res["mia"]["auc"]
        out.update(mia_n_members=res["mia"]["n_members"], mia_member_pool=res["mia"].get("member_pool"))
        if "auc_ref" in res["mia"]:
            out["mia_auc_ref"] = res["mia"]["auc_ref"]
    if "canaries" in res:
        c = res["canaries"]
        out.update(canary_exposure=c["exposure_mean"], canary_exposure_extrapolated=c["exposure_extrapolated_mean"],
                   canary_extraction=c["extraction_rate"], canary_greedy=c["greedy_extracted"])
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _top_examples(gens: list[str], rep: lk.LeakageReport, index: lk.ReferenceIndex, n: int = 3) -> list[dict]:
    order = sorted(range(len(gens)), key=lambda i: -rep.matches[i].score)[:n]
    return [{"generation": gens[i], "rougeL": rep.matches[i].score,
             "match": index.references[rep.matches[i].index] if rep.matches[i].index >= 0 else None}
            for i in order]


def _bertscore_best(gens, rep, index, model_path) -> float | None:
    pairs = [(g, index.references[m.index]) for g, m in zip(gens, rep.matches) if m.index >= 0]
    if not pairs:
        return None
    scores = lk.bertscore([g for g, _ in pairs], [r for _, r in pairs], model_path)
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------
# Wiring to an experiment (pipeline and CLI)
# ------------------------------------------------------------------------------------------------

def victim_clients(pcfg, clients) -> list:
    """The clients whose data the attacker targets: ``privacy.victim_roles`` or every non-malicious client
    (unknown role names are refused at config load by the privacy_extraction plug-in)."""
    roles = pcfg.victim_roles
    if roles is not None:
        return [c for c in clients if c.role in roles]
    return [c for c in clients if not c.malicious]


def prepare_canaries(pcfg, clients, tokenizer, *, seed: int, data, run_dir=None) -> list[Canary]:
    """Make the configured canaries, insert them into victims' data, and record them in the run dir.

    ``pcfg`` is the ``privacy`` section, ``data`` the experiment's ``data`` section (formatting of the rows).
    """
    cc = pcfg.canaries
    if not pcfg.enabled or cc is None:
        return []
    seed = (pcfg.seed if pcfg.seed is not None else seed) + 4242
    canaries = make_canaries(cc.n, cc.digits, seed, cc.instruction, cc.template)
    inject_canaries(canaries, victim_clients(pcfg, clients), tokenizer, cc.repeats, data.max_length,
                    data.system_prompt)
    if run_dir is not None:
        run_dir.write_json("privacy/canaries.json", [asdict(c) for c in canaries])
    return canaries


def attack_data(pcfg, clients, tokenizer, canaries: list[Canary], *, seed: int, data) -> AttackData:
    """Victims' own examples (canaries excluded) and the non-member examples for membership inference."""
    from fedsafe.data import load_pool
    from fedsafe.data.format import tokenize_rows

    canary_ids = set()
    for c in canaries:
        ex = format_example(tokenizer, c.instruction, c.response, data.max_length, data.system_prompt)
        if ex is not None:
            canary_ids.add(tuple(ex.input_ids.tolist()))
    victims, keys = [], []
    for c in victim_clients(pcfg, clients):
        for i, e in enumerate(c.examples):  # the index is what the client's seen_examples report refers to
            if tuple(e.input_ids.tolist()) not in canary_ids:
                victims.append(e)
                keys.append((c.client_id, i))
    sources = pcfg.nonmembers or data.heldout
    nonmembers = []
    if sources and pcfg.n_mia:
        rows = load_pool(sources, seed=seed + 77)
        member_texts = {tuple(e.input_ids.tolist()) for e in victims}
        nonmembers = [e for e in tokenize_rows(tokenizer, rows, data.max_length, data.system_prompt)
                      if tuple(e.input_ids.tolist()) not in member_texts]
    elif pcfg.n_mia:
        log.warning("privacy: no non-member data (privacy.nonmembers or data.heldout); membership inference "
                    "is skipped")
    return AttackData(victims, nonmembers, canaries, keys)


def build_attacker(pcfg, model, tokenizer, flat, init_vec: torch.Tensor, clients, canaries: list[Canary], *,
                   seed: int, data, run_dir=None, progress: bool = True) -> PrivacyAttacker:
    """The privacy attacker of an experiment (victims from ``privacy.victim_roles``)."""
    return PrivacyAttacker(pcfg, model, tokenizer, flat, init_vec,
                           attack_data(pcfg, clients, tokenizer, canaries, seed=seed, data=data), run_dir, progress,
                           seed=seed, max_length=data.max_length, system_prompt=data.system_prompt)
