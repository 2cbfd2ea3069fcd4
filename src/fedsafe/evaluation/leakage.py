"""Training-data leakage metrics: ROUGE-L against the best-matching training text, exact / near-exact rates.

ROUGE-L (Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004) is the F1 of the longest
common subsequence (LCS) of word tokens: P = LCS/|gen|, R = LCS/|ref|, F = 2PR/(P+R). The extraction study
this module serves (Guo et al., "Can Federated Learning Safeguard Private Data in LLM Training?",
Findings of EMNLP 2025) scores every generated text against its best match among the victims' training
texts. An exhaustive search is |gen| x |ref| LCS computations; we instead

1. prefilter: an inverted index of word trigrams (plus rare unigrams as a fallback) ranks the training
   texts by shared n-grams, and only the top ``candidates`` per generation are scored exactly. The result is
   a LOWER BOUND on the best-match ROUGE-L (and on the near-exact rate): a training text that shares no
   trigram and no rare word with a generation is never scored, even when its ROUGE-L is the highest (e.g.
   a generation made of frequent words in another order scores 0 here and 0.625 exhaustively). Reports say
   so (``lower_bound`` in the summary, ``zero_rougeL_lower_bound`` and a ">=" in the privacy table);
   ``exhaustive=True`` (``privacy.exhaustive``) scores every training text and gives the exact value;
2. score each pair with a bit-parallel LCS (Allison & Dix 1986; Hyyro 2004) on Python big integers,
   O(|gen| * ceil(|ref| / word)) instead of O(|gen| * |ref|) Python steps.

10k generations x 10k training texts take seconds (``benchmarks/bench_leakage.py``).

Optional BERTScore (Zhang et al., ICLR 2020) uses any local Hugging Face encoder: greedy cosine matching
of contextual token embeddings, without idf weighting or baseline rescaling.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

_WORD = re.compile(r"\w+", re.UNICODE)

NEAR_EXACT = 0.9


def words(text: str) -> list[str]:
    """Lower-cased word tokens (the tokenisation ROUGE-L is computed on)."""
    return _WORD.findall(text.lower())


def _match_masks(ref: Sequence) -> dict:
    masks: dict = {}
    for j, tok in enumerate(ref):
        masks[tok] = masks.get(tok, 0) | (1 << j)
    return masks


def lcs_length(a: Sequence, b: Sequence, b_masks: dict | None = None) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel, exact)."""
    if not a or not b:
        return 0
    masks = b_masks if b_masks is not None else _match_masks(b)
    full = (1 << len(b)) - 1
    v = full
    for tok in a:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l(generated: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """ROUGE-L F1 of two texts (or pre-tokenised word lists); 0 when either is empty."""
    g = words(generated) if isinstance(generated, str) else list(generated)
    r = words(reference) if isinstance(reference, str) else list(reference)
    lcs = lcs_length(g, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(g), lcs / len(r)
    return 2 * p * rec / (p + rec)


@dataclass
class BestMatch:
    """The best-matching training text of one generation."""

    score: float
    index: int  # index into the references (-1: no reference shares a token)
    exact: bool


@dataclass
class LeakageReport:
    """Per-generation best matches and the summary rates."""

    matches: list[BestMatch]
    summary: dict = field(default_factory=dict)


class ReferenceIndex:
    """Training texts indexed by word trigrams and rare unigrams for fast best-match search."""

    def __init__(self, references: Sequence[str], ngram: int = 3, max_df: float = 0.01):
        self.references = list(references)
        self.tokens = [words(r) for r in self.references]
        self.ngram = ngram
        self._masks: dict[int, dict] = {}
        self.grams: dict[tuple, list[int]] = defaultdict(list)
        unigram_df: Counter = Counter()
        for i, toks in enumerate(self.tokens):
            for g in set(_ngrams(toks, ngram)):
                self.grams[g].append(i)
            unigram_df.update(set(toks))
        # frequent words (df above max_df of the corpus, at least 20 texts) say nothing about the source
        limit = max(20, int(max_df * len(self.tokens)))
        self.unigrams: dict[str, list[int]] = defaultdict(list)
        for i, toks in enumerate(self.tokens):
            for t in set(toks):
                if unigram_df[t] <= limit:
                    self.unigrams[t].append(i)
        self.exact = {tuple(t): i for i, t in reversed(list(enumerate(self.tokens)))}

    def masks(self, i: int) -> dict:
        m = self._masks.get(i)
        if m is None:
            m = self._masks[i] = _match_masks(self.tokens[i])
        return m

    def candidates(self, gen_tokens: list[str], k: int) -> list[int]:
        """Up to ``k`` reference indices ranked by shared trigrams, then shared rare unigrams."""
        tri: Counter = Counter()
        for g in set(_ngrams(gen_tokens, self.ngram)):
            for i in self.grams.get(g, ()):
                tri[i] += 1
        uni: Counter = Counter()
        if len(tri) < k:  # too few trigram hits (weak or no leakage): fall back to shared rare words
            for t in set(gen_tokens):
                for i in self.unigrams.get(t, ()):
                    uni[i] += 1
        pool = set(tri) | set(uni)
        return sorted(pool, key=lambda i: (-tri[i], -uni[i], i))[:k]

    def best_match(self, generated: str, k: int = 8, exhaustive: bool = False) -> BestMatch:
        """The reference with the highest ROUGE-L F1 among the prefiltered candidates (or all)."""
        g = words(generated)
        if not g:
            return BestMatch(0.0, -1, False)
        hit = self.exact.get(tuple(g))
        if hit is not None:
            return BestMatch(1.0, hit, True)
        cands = range(len(self.tokens)) if exhaustive else self.candidates(g, k)
        best, best_i = 0.0, -1
        for i in cands:
            r = self.tokens[i]
            lcs = lcs_length(g, r, self.masks(i))
            if lcs == 0:
                continue
            p, rec = lcs / len(g), lcs / len(r)
            f = 2 * p * rec / (p + rec)
            if f > best:
                best, best_i = f, i
        return BestMatch(best, best_i, False)


def _ngrams(tokens: list[str], n: int):
    if len(tokens) < n:
        return [tuple(tokens)] if tokens else []
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def leakage(generations: Sequence[str], references: Sequence[str] | ReferenceIndex, *, candidates: int = 8,
            near_exact: float = NEAR_EXACT, exhaustive: bool = False) -> LeakageReport:
    """Best-match ROUGE-L of each generation against the training texts, with exact/near-exact rates.

    ``exact``: the generation's word sequence equals a training text; ``near_exact``: best ROUGE-L F1 >=
    ``near_exact`` (0.9 by default, as in the extraction literature). Without ``exhaustive`` only the n-gram
    prefilter's ``candidates`` are scored, so the scores and the near-exact rate are lower bounds (the summary
    says ``lower_bound: True``); the exact rate is exact either way.
    """
    index = references if isinstance(references, ReferenceIndex) else ReferenceIndex(references)
    matches = [index.best_match(g, candidates, exhaustive) for g in generations]
    summary = summarize(matches, near_exact)
    summary.update(search="exhaustive" if exhaustive else f"prefilter(candidates={candidates})",
                   lower_bound=not exhaustive)
    return LeakageReport(matches, summary)


def summarize(matches: Sequence[BestMatch], near_exact: float = NEAR_EXACT) -> dict:
    """Mean / max / median ROUGE-L and exact / near-exact match rates of a list of best matches."""
    n = len(matches)
    if n == 0:
        return {"n": 0, "rougeL_mean": None, "rougeL_max": None, "rougeL_median": None,
                "exact_rate": None, "near_exact_rate": None, "distinct_sources": 0}
    scores = sorted(m.score for m in matches)
    return {"n": n, "rougeL_mean": sum(scores) / n, "rougeL_max": scores[-1],
            "rougeL_median": scores[n // 2] if n % 2 else 0.5 * (scores[n // 2 - 1] + scores[n // 2]),
            "exact_rate": sum(m.exact for m in matches) / n,
            "near_exact_rate": sum(m.score >= near_exact for m in matches) / n,
            "distinct_sources": len({m.index for m in matches if m.score >= near_exact})}


def pairwise(generations: Sequence[str], targets: Sequence[str], near_exact: float = NEAR_EXACT) -> dict:
    """ROUGE-L of aligned (generation, target) pairs, e.g. completions vs the true suffixes."""
    if len(generations) != len(targets):
        raise ValueError(f"{len(generations)} generations but {len(targets)} targets")
    matches = []
    for g, t in zip(generations, targets):
        gw, tw = words(g), words(t)
        exact = bool(gw) and gw == tw
        matches.append(BestMatch(1.0 if exact else rouge_l(gw, tw), 0, exact))
    out = summarize(matches, near_exact)
    out.pop("distinct_sources", None)
    return out


def bertscore(generations: Sequence[str], references: Sequence[str], model_name_or_path: str,
              layer: int = -1, batch_size: int = 16, device: str = "cpu") -> list[float]:
    """BERTScore F1 (Zhang et al. 2020) of aligned pairs with a local encoder; no idf, no rescaling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(model_name_or_path).to(device).eval()
    return bertscore_with(model, tok, generations, references, layer, batch_size)


def bertscore_with(model, tokenizer, generations: Sequence[str], references: Sequence[str], layer: int = -1,
                   batch_size: int = 16) -> list[float]:
    """BERTScore F1 with an already loaded encoder (any model returning hidden states)."""
    import torch

    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    device = next(model.parameters()).device

    @torch.no_grad()
    def embed(texts):
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=512,
                        add_special_tokens=False).to(device)
        out = model(**enc, output_hidden_states=True)
        h = torch.nn.functional.normalize(out.hidden_states[layer].float(), dim=-1)
        return h, enc["attention_mask"].bool()

    scores: list[float] = []
    for s in range(0, len(generations), batch_size):
        hg, mg = embed(generations[s: s + batch_size])
        hr, mr = embed(references[s: s + batch_size])
        sim = hg @ hr.transpose(1, 2)  # [b, lg, lr]
        sim = sim.masked_fill(~mr[:, None, :], -2.0).masked_fill(~mg[:, :, None], -2.0)
        p = (sim.max(2).values * mg).sum(1) / mg.sum(1).clamp(min=1)
        r = (sim.max(1).values * mr).sum(1) / mr.sum(1).clamp(min=1)
        f = torch.where((p + r) > 0, 2 * p * r / (p + r), torch.zeros_like(p))
        scores.extend(f.tolist())
    return scores


# ------------------------------------------------------------------------------------------------
# Leakage versus utility across runs (defenses, models)
# ------------------------------------------------------------------------------------------------

#: Safety alignment of the models fedsafe can load here (None: unknown; declare others by hub id).
#: The embedded SmolLM2-135M-Instruct is instruction-tuned but NOT safety-aligned (it answers harmful
#: requests); the tiny test model is random. Chat models with RLHF/safety tuning (e.g. Llama-2-*-chat,
#: Llama-3.x-*-Instruct) count as aligned in Guo et al.'s comparison.
MODEL_ALIGNMENT: dict[str, bool | None] = {
    "embedded": False, "HuggingFaceTB/SmolLM2-135M-Instruct": False, "tiny": False,
    "meta-llama/Llama-2-7b-chat-hf": True, "meta-llama/Llama-2-13b-chat-hf": True,
    "meta-llama/Meta-Llama-3-8B-Instruct": True, "meta-llama/Llama-3.1-8B-Instruct": True,
    "meta-llama/Llama-2-7b-hf": False, "meta-llama/Meta-Llama-3-8B": False,
}

# eps_client/delta_client: client-level DP-FedAvg (a whole client's data, replace-one); eps_example/delta_example:
# local DP-SGD (one training example of a client; the largest over the clients). Different units: never merged.
TABLE_COLUMNS = ("run", "model", "aligned", "defense", "eps_client", "delta_client", "eps_example",
                 "delta_example", "variant", "round", "zero_rougeL", "zero_near_exact", "zero_rougeL_lower_bound",
                 "zero_exact", "partial30_rougeL", "partial30_exact", "partial80_rougeL", "partial80_exact",
                 "mia_auc", "mia_auc_ref", "mia_n_members", "mia_member_pool", "canary_exposure",
                 "canary_extraction", "heldout_loss", "helpfulness_proxy")

#: columns that are lower bounds when the row's zero_rougeL_lower_bound is true (n-gram prefilter)
LOWER_BOUND_COLUMNS = ("zero_rougeL", "zero_near_exact")


def defense_label(cfg: dict) -> str:
    """A short name of the privacy defenses in a run's config (``none`` when there are none)."""
    parts = []
    dp = cfg.get("dp") or {}
    if dp.get("client_level"):
        parts.append(f"client-DP(sigma={dp.get('noise_multiplier')},C={dp.get('clip_norm')})")
    if dp.get("local"):
        parts.append(f"local-DP-SGD(sigma={dp.get('local_noise_multiplier')},C={dp.get('local_clip_norm')})")
    c = cfg.get("constrained") or {}
    if c.get("l2_mu"):
        parts.append(f"L2(mu={c['l2_mu']})")
    if c.get("kl_beta"):
        parts.append(f"KL(beta={c['kl_beta']})")
    return "+".join(parts) or "none"


def expand_run_dirs(paths) -> list:
    """Run directories from run or grid directories (a grid's runs sit under ``GRID/runs/``), in order."""
    from pathlib import Path

    from fedsafe.errors import FedsafeError
    from fedsafe.rundir import grid_run_dirs

    out = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            out.append(p)
            continue
        runs = grid_run_dirs(p)
        if not runs:
            raise FedsafeError(f"{p} is neither a run directory (no config.yaml) nor a grid directory with runs "
                               "under runs/")
        out.extend(runs)
    return out


def leakage_utility_rows(run_dirs) -> list[dict]:
    """One row per (run, attack variant) at each run's last attacked round: leakage, privacy budget, utility.

    ``run_dirs`` may hold grid directories: their runs are read in turn (:func:`expand_run_dirs`).
    """
    import yaml

    from fedsafe.rundir import RunDir

    rows = []
    for rd in expand_run_dirs(run_dirs):
        cfg = yaml.safe_load((rd / "config.yaml").read_text()) or {}
        records = RunDir(rd).records()
        priv = [r for r in records if r.get("type") == "privacy"]
        if not priv:
            continue
        last = max(r["round"] for r in priv)
        # client-level and example-level epsilon are different guarantees: each gets its own column
        dp_recs = [r for r in records if r.get("type") == "dp" and r.get("round", 0) <= last]
        local = [r for r in records if r.get("type") == "client" and r.get("dp_epsilon") is not None
                 and r.get("round", 0) <= last]
        worst_local = max(local, key=lambda r: r["dp_epsilon"]) if local else {}
        heldout = [r for r in records if r.get("type") == "heldout"]
        evals = [r for r in records if r.get("type") == "eval" and r.get("defense", "none") == "none"]
        model = (cfg.get("model") or {}).get("name", "?")
        latest = {r.get("variant"): r for r in priv if r["round"] == last}  # a re-run attack replaces the old
        for r in latest.values():
            row = {"run": rd.name, "model": model, "aligned": MODEL_ALIGNMENT.get(model),
                   "defense": defense_label(cfg), "variant": r.get("variant"), "round": last,
                   "eps_client": dp_recs[-1]["epsilon"] if dp_recs else None,
                   "delta_client": dp_recs[-1].get("delta") if dp_recs else None,
                   "eps_example": worst_local.get("dp_epsilon"), "delta_example": worst_local.get("dp_delta"),
                   "heldout_loss": heldout[-1].get("after") if heldout else None,
                   "helpfulness_proxy": evals[-1].get("helpfulness_proxy") if evals else None}
            row.update({k: r.get(k) for k in TABLE_COLUMNS if k not in row})
            rows.append(row)
    return rows


def _fmt(v, col: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.2e}" if col.startswith("delta") else f"{v:.3f}"
    return str(v)


def leakage_utility_markdown(rows: list[dict]) -> str:
    """The leakage-versus-utility rows as a Markdown table (">=": a lower bound from the n-gram prefilter)."""
    cols = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            cell = _fmt(r.get(c), c)
            if c in LOWER_BOUND_COLUMNS and r.get("zero_rougeL_lower_bound") and r.get(c) is not None:
                cell = ">=" + cell
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_leakage_utility(run_dirs, out_dir, leakage_key: str = "zero_rougeL",
                          utility_key: str = "heldout_loss") -> dict:
    """Write privacy_table.{csv,md} and plots/privacy_leakage_utility.png into ``out_dir``.

    For the report: ``write_leakage_utility([run_dir], run_dir)`` (one run) or a grid's run dirs and its
    folder; returns {"rows", "csv", "md", "plot"} (plot None when nothing can be plotted).
    """
    import csv
    import io
    from pathlib import Path

    from fedsafe.io import atomic_write_text

    out = Path(out_dir)
    rows = leakage_utility_rows(run_dirs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "privacy_table.csv", buf.getvalue())
    md = ("# Privacy leakage versus utility\n\n"
          "Leakage: best-match ROUGE-L / exact rates of zero-input generations, exact suffix rate of 30%/80% "
          "prefix completions, membership-inference AUC, canary exposure (bits) and extraction rate. "
          "Utility: held-out loss after training (lower is better) and the helpfulness proxy.\n\n"
          "A \">=\" marks a lower bound: with the n-gram prefilter (privacy.exhaustive: false) a best match that "
          "shares no word trigram or rare word with a generation is never scored; privacy.exhaustive: true gives "
          "the exact value. Membership-inference members are victim examples actually trained on "
          "(mia_member_pool: trained_on). eps_client/delta_client: client-level DP-FedAvg (neighbouring "
          "datasets differ in one client's data); eps_example/delta_example: local DP-SGD (one training example; "
          "the largest over the clients). The two are different guarantees and are not comparable.\n\n"
          + leakage_utility_markdown(rows))
    atomic_write_text(out / "privacy_table.md", md)
    plot = _plot_leakage_utility(rows, out / "plots" / "privacy_leakage_utility.png", leakage_key, utility_key)
    return {"rows": rows, "csv": out / "privacy_table.csv", "md": out / "privacy_table.md", "plot": plot}


def _plot_leakage_utility(rows, path, leakage_key, utility_key):
    pts = [r for r in rows if r.get(leakage_key) is not None and r.get(utility_key) is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"plain": "o", "logit_contrast": "^", "param_contrast": "s"}
    models = sorted({r["model"] for r in pts})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in pts:
        ax.scatter(r[utility_key], r[leakage_key], marker=markers.get(r["variant"], "x"),
                   color=colors[models.index(r["model"]) % len(colors)])
        if r["variant"] == "plain":
            ax.annotate(r["defense"], (r[utility_key], r[leakage_key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for v, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=v)
    for i, mname in enumerate(models):
        ax.scatter([], [], marker="o", color=colors[i % len(colors)], label=f"model: {mname}")
    ax.set_xlabel(f"{utility_key} (utility)")
    ax.set_ylabel(f"{leakage_key} (leakage)")
    ax.set_title("Privacy leakage versus utility")
    ax.legend(fontsize=7)
    from fedsafe.results import save_figure as _save  # atomic write, the one figure saver

    return _save(fig, path)
