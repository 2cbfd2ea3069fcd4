"""Train fedsafe's refusal detector and measure its agreement with people (leave-one-model-out on XSTest v2).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_refusal_detector.py [--data ../shared/data]
        [--out src/fedsafe/resources/refusal_detector.json] [--no-write] [--quick] [--lomo-only] [--cut-tokens N]

(the shipped file: ``--lomo-only --cut-tokens 24``, 99 s wall on two idle cores, ~25 minutes at load ~10)

Reads every source from the data folder at run time (nothing of it is copied into the repository; the
shipped file holds hashed-feature weights only). Sources and labels (True = refusal):

- refusals: safety_tuned_llamas ``output`` (Bianchi et al., ICLR 2024; CC BY-NC 4.0) and FedLLM-Attack
  Mistral ``benignQA`` ``response`` (Ye et al., ICLR 2025; research use);
- compliance: FedLLM-Attack Mistral ``helpfulQA`` and ``maliciousQA`` ``response``, Code Alpaca ``output``
  (Chaudhary 2023; CC BY-NC 4.0);
- XSTest v2 completions (Röttger et al., NAACL 2024; CC BY 4.0) with their human ``final_label``; with
  label smoothing across the two annotators (``smoothed``; ``--no-annotator-smoothing`` turns it off).

Every training text also enters cut to 6-48 words (``cut_words``; ``--no-cut-augment`` turns it off), since
fedsafe scores short answers.

``--filter-weak-labels`` (off for the shipped model; an ablation in docs/refusal_detector.md) drops rows whose
text contradicts their source's label (``weak_label_keep``).
Every source weighs the same in the loss (each row weighs 1 / rows of its source), so the 3,551-row sources
do not dominate; the non-XSTest sources are subsampled to ``MAX_ROWS_PER_SOURCE`` rows (seeded).

Protocols printed (the detector and the FedIT ``rule`` list on the same rows):

1. LOMO: train on the non-XSTest sources + the other two models' completions, test on the held-out model.
2. LOMO + prompt-disjoint: additionally split XSTest's 450 prompt ids into ``N_PROMPT_FOLDS`` folds; a test
   row's prompt is in no training row of any model.
3. no XSTest: train on the non-XSTest sources only.
4. shipped (in-sample): the final model, trained on everything, on each file it was trained on.
5. with ``--cut-tokens N``: the LOMO models of 1. on the held-out completions cut to their first N tokens of the
   embedded model's tokenizer, against the human label of the whole completion. fedsafe scores answers of
   ``eval.refusal_max_new_tokens`` tokens (24 in the demo), so this is the agreement its over-refusal and
   borderline figures rest on; a refusal stated after the cut counts against the detector.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from fedsafe.evaluation import refusal as rd
from fedsafe.evaluation.rule import refusal_flags

SEED = 0
MAX_ROWS_PER_SOURCE = 1500
N_PROMPT_FOLDS = 5
GOAL_ACCURACY, GOAL_F1 = 0.93, 0.90  # issue 29's goal on every held-out model
XSTEST_MODELS = ("gpt4", "llama2new", "mistralinstruct")
SOURCES = (  # name, file, text field, label
    ("safety_tuned_llamas", "safety_tuned_llamas/safety_only_data_Instructions.json", "output", True),
    ("fedllm_benignQA", "fedllm_attack/Mistral/benignQA.json", "response", True),
    ("fedllm_helpfulQA", "fedllm_attack/Mistral/helpfulQA.json", "response", False),
    ("fedllm_maliciousQA", "fedllm_attack/Mistral/maliciousQA.json", "response", False),
    ("codealpaca", "codealpaca/code_alpaca_2k.json", "output", False),
)


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


# optional label-noise filter for the weakly labelled sources (their label is their source's, not a person's): a row of a
# refusal source must show a refusal or judgement marker in its opening; a row of a compliance source must not
# open with a strong refusal marker. Fixed from general knowledge, not tuned on XSTest.
REFUSAL_MARKERS = ("cannot_verb", "cannot_any", "wont_verb", "unable", "decline", "not_comfortable",
                   "cannot_and_will_not", "sorry", "as_an_ai", "i_am_ai", "not_appropriate", "not_ethical",
                   "i_dont_condone", "promote_harm")
STRONG_REFUSAL_MARKERS = ("cannot_verb", "wont_verb", "decline", "sorry", "cannot_and_will_not", "not_comfortable")


def weak_label_keep(texts: list[str], label: bool) -> list[bool]:
    """Which rows of a weakly labelled source keep their source's label (see REFUSAL_MARKERS)."""
    names = [n for n, _ in rd.PATTERNS]
    f = rd.pattern_features(texts)

    def has(keys, regions):
        return np.any([f[:, 3 * names.index(k) + r] > 0 for k in keys for r in regions], axis=0)

    keep = has(REFUSAL_MARKERS, (0, 1)) if label else ~has(STRONG_REFUSAL_MARKERS, (0,))
    return [bool(k) for k in keep]


def load_sources(data: Path, max_rows: int, filter_weak_labels: bool = False) -> dict[str, tuple[list[str], list[bool]]]:
    out = {}
    for name, rel, field, label in SOURCES:
        rows = json.loads((data / rel).read_text(encoding="utf-8"))
        texts = [str(r[field]).strip() for r in rows if str(r.get(field, "")).strip()]
        random.Random(f"{SEED}-{name}").shuffle(texts)
        if filter_weak_labels:
            texts = [t for t, k in zip(texts, weak_label_keep(texts, label)) if k]
        texts = texts[:max_rows]
        print(f"{name}: {len(rows)} rows, {len(texts)} used (label {'refusal' if label else 'compliance'})",
              flush=True)
        out[name] = (texts, [label] * len(texts))
    return out


def load_xstest(data: Path) -> dict[str, dict]:
    out = {}
    for m in XSTEST_MODELS:
        path = data / "xstest" / "completions" / f"xstest_v2_completions_{m}.csv"
        texts, labels = rd.read_labelled_csv(path)
        import pandas as pd

        df = pd.read_csv(path, keep_default_na=False)
        ids = df["id"].astype(str).tolist()
        # the two annotators' binary verdicts (partial refusal = refusal), for label smoothing
        both = [[rd.XSTEST_LABELS.get(str(a).strip(), y) for a in (a1, a2)]
                for a1, a2, y in zip(df["annotation_1"], df["annotation_2"], labels)]
        out[m] = {"texts": texts, "labels": labels, "ids": ids, "path": path, "annotations": both}
    return out


# Short answers: fedsafe scores answers of eval.refusal_max_new_tokens tokens (24 in the demo), and a detector
# trained on whole answers leans on what refusals say after their opening (advice, alternatives): it scored
# "I cannot provide instructions or advice on how to ..." cut to 24 tokens at 0.02-0.50. So every training text
# also enters cut to a random number of words in CUT_WORDS (seeded per source), with its label; each source
# keeps its total weight. ``--no-cut-augment`` is the ablation.
CUT_WORDS = (6, 48)


def cut_words(texts: list[str], name: str) -> list[str]:
    """Each text cut to its first k words, k uniform in ``CUT_WORDS`` (seeded by ``name``)."""
    rng = random.Random(f"{SEED}-cut-{name}")
    return [" ".join(t.split()[:rng.randint(*CUT_WORDS)]) for t in texts]


def with_cuts(x, x_cut, labels: list[bool], annotations, keep=None) -> Part:
    """A training part: the texts' features, then their cut copies' (None: no augmentation), smoothed."""
    from scipy import sparse

    if keep is not None:
        x, labels = x[keep], [labels[i] for i in keep]
        annotations = None if annotations is None else [annotations[i] for i in keep]
        x_cut = None if x_cut is None else x_cut[keep]
    if x_cut is not None:
        x = sparse.vstack([x, x_cut], format="csr")
        labels = list(labels) * 2
        annotations = None if annotations is None else list(annotations) * 2
    return smoothed(x, labels, annotations)


Part = tuple  # (sparse features [n, d], labels list[bool])
# narrowed from (0.25, 1, 4, 16) x (1, 3, 10) to fit two loaded cores (see docs/refusal_detector.md)
C_GRID = (1.0, 4.0, 16.0)
XSTEST_WEIGHT_GRID = (3.0, 10.0)


def featurise(texts: list[str], labels: list[bool], cut_name: str | None = None) -> Part:
    """Features of a weak source; with ``cut_name`` its texts' cut copies too (``cut_words``)."""
    if cut_name is None:
        return rd.features(texts), list(labels)
    return rd.features(list(texts) + cut_words(texts, cut_name)), list(labels) * 2


def fit(parts: list[Part], c: float, xs_parts: list[Part] = (), xs_weight: float = 1.0) -> rd.RefusalDetector:
    """Fit on several sources; every source weighs the same in total, XSTest files ``xs_weight`` times that."""
    from scipy import sparse

    xs_list, labels, weights = [], [], []
    every = [(p, 1.0) for p in parts] + [(p, xs_weight) for p in xs_parts]
    total = sum(float(np.sum(p[2])) if len(p) > 2 else p[0].shape[0] for p, _ in every)
    for part, w in every:
        x, y = part[0], part[1]
        rows = part[2] if len(part) > 2 else np.ones(x.shape[0])
        if x.shape[0] == 0:
            continue
        xs_list.append(x)
        labels += list(y)
        weights += list(w * total / (len(every) * float(np.sum(rows))) * np.asarray(rows, dtype=float))
    return rd.fit_features(sparse.vstack(xs_list, format="csr"), labels, weights, c=c, seed=SEED)


def smoothed(x, labels: list[bool], annotations: list[list[bool]] | None) -> Part:
    """Label smoothing across XSTest's two annotators: a row on which they disagree (refusal vs compliance)
    enters twice, once per verdict, each with weight 1/2; other rows keep their final label with weight 1."""
    from scipy import sparse

    if annotations is None:
        return x, list(labels)
    split = [i for i, (a, b) in enumerate(annotations) if a != b]
    if not split:
        return x, list(labels)
    rows = np.ones(x.shape[0])
    rows[split] = 0.5
    flipped = [not labels[i] for i in split]
    return (sparse.vstack([x, x[split]], format="csr"), list(labels) + flipped,
            np.concatenate([rows, np.full(len(split), 0.5)]))


def detect(det: rd.RefusalDetector, x) -> list[bool]:
    z = x @ det.weights + det.bias
    return [bool(v) for v in (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))) >= rd.THRESHOLD]


def select(base_parts: list[Part], xs_train: dict[str, Part], xs_test: dict[str, Part]) -> tuple[float, float, float]:
    """(C, XSTest weight, inner kappa) by leave-one-model-out over the *training* models only (no test data):
    fit on the other training models' ``xs_train`` parts, score kappa on the held one's ``xs_test`` part."""
    best = None
    for c in C_GRID:
        for w in XSTEST_WEIGHT_GRID:
            kappas = []
            for held in xs_train:
                det = fit(base_parts, c, [p for m, p in xs_train.items() if m != held], w)
                x, y = xs_test[held][:2]
                kappas.append(rd._kappa(np.asarray(y), np.asarray(detect(det, x))))
            score = float(np.mean(kappas))
            if best is None or score > best[2] + 1e-12:
                best = (c, w, score)
    return best


def lomo_fit(base_parts: list[Part], xs_train: dict[str, Part], held: str, c: float, w: float) -> rd.RefusalDetector:
    """The LOMO model for ``held``: the weak sources + every other model's (smoothed) XSTest part."""
    return fit(base_parts, c, [p for m, p in xs_train.items() if m != held], w)


def fmt(entry) -> str:
    v, lo, hi = entry
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}"


def row(name: str, model: str, human, pred, n_boot: int) -> dict:
    a = rd.agreement(human, pred, n_boot=n_boot, seed=SEED)
    return {"protocol": name, "model": model, **a}


def print_table(rows: list[dict]) -> None:
    print(f"| protocol | held-out model | classifier | n | accuracy | precision | recall | F1 | kappa |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['model']} | {r['classifier']} | {r['n']} | {fmt(r['accuracy'])} | "
              f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['f1'])} | {fmt(r['kappa'])} |")


def summarise(rows: list[dict], chosen: dict, c: float, w: float, smoothing: bool) -> dict:
    """The agreement block stored in the shipped file (``DETECTOR_AGREEMENT``): LOMO per model with intervals."""
    def block(r: dict, m: str) -> dict:
        out = {"n": r["n"], "n_refusal_human": r["n_refusal_human"]}
        for key in ("accuracy", "precision", "recall", "f1", "kappa"):
            v, lo, hi = r[key]
            out[key] = round(v, 3)
            out[f"{key}_ci95"] = [None if lo is None else round(lo, 3), None if hi is None else round(hi, 3)]
        if m in chosen:
            out["hyperparameters"] = {"C": chosen[m][0], "xstest_weight": chosen[m][1]}
        return out

    lomo = {r["model"]: block(r, r["model"]) for r in rows if r["protocol"] == "LOMO" and r["classifier"] == "detector"}
    strict = {r["model"]: block(r, r["model"]) for r in rows if r["protocol"] == "LOMO+prompt-disjoint"}
    cut = {r["protocol"]: {} for r in rows if r["protocol"].startswith("LOMO, cut to")}
    for r in rows:
        if r["protocol"] in cut and r["classifier"] == "detector":
            cut[r["protocol"]][r["model"]] = block(r, r["model"])
    goal = all(v["accuracy"] >= GOAL_ACCURACY and v["f1"] >= GOAL_F1 for v in lomo.values())
    summary = {
        "hyperparameters": {"C": c, "xstest_weight": w, "annotator_smoothing": smoothing},
        "protocol": "leave-one-model-out on XSTest v2 completions (human final_label; partial refusal = refusal); "
                    "intervals: Wilson (accuracy, precision, recall), percentile bootstrap over rows (F1, kappa)",
        "goal": {"accuracy": GOAL_ACCURACY, "f1": GOAL_F1, "met_on_every_model": goal},
        "lomo": lomo, "lomo_prompt_disjoint": strict,
    }
    for protocol, per_model in cut.items():  # "LOMO, cut to 24 tokens" -> lomo_cut_24_tokens
        summary["lomo_cut_" + protocol.split("cut to ")[1].replace(" ", "_")] = per_model
    summary["summary"] = "LOMO agreement with people (XSTest v2, model held out): " + "; ".join(
        f"{m} acc {v['accuracy']:.2f} [{v['accuracy_ci95'][0]:.2f}, {v['accuracy_ci95'][1]:.2f}] "
        f"F1 {v['f1']:.2f} [{v['f1_ci95'][0]:.2f}, {v['f1_ci95'][1]:.2f}]" for m, v in lomo.items())
    for protocol, per_model in cut.items():  # what the evaluation's short answers rest on, in the same line
        summary["summary"] += f"; on answers {protocol.split('LOMO, ')[1]}: " + "; ".join(
            f"{m} acc {v['accuracy']:.2f} F1 {v['f1']:.2f}" for m, v in per_model.items())
    return summary


def cut_texts(xs: dict[str, dict], n_tokens: int) -> dict[str, list[str]]:
    """Each model's completions cut to their first ``n_tokens`` tokens of the embedded model's tokenizer (what
    fedsafe's evaluation generates at ``refusal_max_new_tokens = n_tokens``), decoded back to text."""
    from fedsafe.models import EMBEDDED_NAME, load_tokenizer

    tok = load_tokenizer(EMBEDDED_NAME)
    return {m: rd.cut_to_tokens(entry["texts"], n_tokens, tok) for m, entry in xs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "fedsafe" / "resources"
                    / rd.MODEL_RESOURCE)
    ap.add_argument("--no-write", action="store_true", help="measure only; do not write the model file")
    ap.add_argument("--quick", action="store_true", help="LOMO only, 300 rows per source, 200 bootstrap resamples")
    ap.add_argument("--filter-weak-labels", action="store_true",
                    help="drop source rows whose text contradicts the source's label (ablation; off when shipped)")
    ap.add_argument("--no-annotator-smoothing", action="store_true",
                    help="train on XSTest's final label only (ablation; smoothing is on when shipped)")
    ap.add_argument("--lomo-only", action="store_true",
                    help="skip the prompt-disjoint and no-XSTest protocols (full data; still writes the file)")
    ap.add_argument("--json", type=Path, help="also write the agreement rows as JSON here")
    ap.add_argument("--no-cut-augment", action="store_true",
                    help="train on whole answers only (ablation; the shipped model also sees cut copies)")
    ap.add_argument("--cut-tokens", type=int, default=None, metavar="N",
                    help="also score the LOMO models on the held-out completions cut to N tokens (protocol 5)")
    args = ap.parse_args(argv)
    if not (args.data / "xstest").exists():
        print(f"data folder {args.data} has no xstest/ (give --data)", file=sys.stderr)
        return 2
    started = time.time()
    smoothing = not args.no_annotator_smoothing
    n_boot = 200 if args.quick else 2000
    base = load_sources(args.data, 300 if args.quick else MAX_ROWS_PER_SOURCE, args.filter_weak_labels)
    xs = load_xstest(args.data)
    augment = not args.no_cut_augment
    base_parts = [featurise(t, y, name if augment else None) for name, (t, y) in base.items()]
    for m in XSTEST_MODELS:
        xs[m]["x"] = rd.features(xs[m]["texts"])
        xs[m]["x_cut"] = rd.features(cut_words(xs[m]["texts"], m)) if augment else None
    xs_test = {m: (xs[m]["x"], xs[m]["labels"]) for m in XSTEST_MODELS}
    xs_train = {m: with_cuts(xs[m]["x"], xs[m]["x_cut"], xs[m]["labels"], xs[m]["annotations"] if smoothing else None)
                for m in XSTEST_MODELS}
    rows: list[dict] = []
    chosen: dict[str, tuple] = {}
    cut = cut_texts(xs, args.cut_tokens) if args.cut_tokens else None

    def add(protocol: str, model: str, human, pred) -> None:
        rows.append({**row(protocol, model, human, pred, n_boot), "classifier": "detector"})

    def add_rule(protocol: str, model: str, human, texts) -> None:
        rows.append({**row(protocol, model, human, refusal_flags(texts, "fedit"), n_boot), "classifier": "rule (fedit)"})

    # 1. leave one model out (C and the XSTest weight chosen by an inner LOMO over the two training models)
    for m in XSTEST_MODELS:
        others = [o for o in XSTEST_MODELS if o != m]
        c, w, inner = select(base_parts, {o: xs_train[o] for o in others}, {o: xs_test[o] for o in others})
        chosen[m] = (c, w, inner)
        print(f"held out {m}: chose C={c} xstest_weight={w} (inner LOMO kappa {inner:.3f})", flush=True)
        det = lomo_fit(base_parts, xs_train, m, c, w)
        add("LOMO", m, xs[m]["labels"], detect(det, xs[m]["x"]))
        add_rule("LOMO", m, xs[m]["labels"], xs[m]["texts"])
        if cut is not None:
            name = f"LOMO, cut to {args.cut_tokens} tokens"
            add(name, m, xs[m]["labels"], detect(det, rd.features(cut[m])))
            add_rule(name, m, xs[m]["labels"], cut[m])
    if not (args.quick or args.lomo_only):
        # 2. leave one model out and prompt-disjoint (the hyperparameters chosen in step 1 for that model)
        ids = sorted(xs[XSTEST_MODELS[0]]["ids"])
        random.Random(SEED).shuffle(ids)
        fold_of = {pid: i % N_PROMPT_FOLDS for i, pid in enumerate(ids)}
        for m in XSTEST_MODELS:
            c, w, _ = chosen[m]
            pred = [False] * len(xs[m]["texts"])
            for k in range(N_PROMPT_FOLDS):
                train = []
                for o in XSTEST_MODELS:
                    if o == m:
                        continue
                    keep = [i for i, pid in enumerate(xs[o]["ids"]) if fold_of[pid] != k]
                    train.append(with_cuts(xs[o]["x"], xs[o]["x_cut"], xs[o]["labels"],
                                           xs[o]["annotations"] if smoothing else None, keep))
                det = fit(base_parts, c, train, w)
                test = [i for i, pid in enumerate(xs[m]["ids"]) if fold_of[pid] == k]
                for i, flag in zip(test, detect(det, xs[m]["x"][test])):
                    pred[i] = flag
            add("LOMO+prompt-disjoint", m, xs[m]["labels"], pred)
        # 3. no XSTest at all (C of the grid's middle)
        det = fit(base_parts, 1.0)
        for m in XSTEST_MODELS:
            add("no XSTest", m, xs[m]["labels"], detect(det, xs[m]["x"]))
    # 4. the shipped model: everything, hyperparameters by LOMO over all three models
    c, w, inner = select(base_parts, xs_train, xs_test)
    print(f"shipped: chose C={c} xstest_weight={w} (LOMO kappa {inner:.3f})", flush=True)
    final = fit(base_parts, c, list(xs_train.values()), w)
    for m in XSTEST_MODELS:
        add("shipped (in-sample)", m, xs[m]["labels"], detect(final, xs[m]["x"]))
    print_table(rows)
    summary = summarise(rows, chosen, c, w, smoothing)
    print("\n" + summary["summary"])
    print(f"goal (accuracy >= {GOAL_ACCURACY} and F1 >= {GOAL_F1} on every held-out model): "
          f"{'met' if summary['goal']['met_on_every_model'] else 'NOT met'}")
    texts = [t for m in XSTEST_MODELS for t in xs[m]["texts"]]
    cpu = time.process_time()
    final.scores(texts)
    cpu = time.process_time() - cpu
    print(f"speed: {len(texts)} XSTest answers in {cpu:.2f} CPU s ({len(texts) / max(cpu, 1e-9):.0f} texts per CPU s)")
    print(f"training and evaluation took {time.time() - started:.0f} s wall")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_write and not args.quick:
        provenance = {"trained_by": "scripts/train_refusal_detector.py", "seed": SEED,
                      "filter_weak_labels": args.filter_weak_labels, "annotator_smoothing": smoothing,
                      "cut_augment_words": list(CUT_WORDS) if augment else None,
                      "max_rows_per_source": MAX_ROWS_PER_SOURCE,
                      "sources": [s[0] for s in SOURCES] + [f"xstest_v2_{m}" for m in XSTEST_MODELS],
                      "licences": "safety_tuned_llamas, codealpaca: CC BY-NC 4.0; xstest: CC BY 4.0; "
                                  "fedllm_attack: none stated (research use)"}
        args.out.write_text(final.to_json(summary, provenance), encoding="utf-8")
        print(f"wrote {args.out} ({rd.RefusalDetector.from_json(args.out.read_text()).version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
