"""Would a frozen encoder make the refusal detector generalise better? A leave-one-model-out experiment.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/refusal_encoder_experiment.py [--data ../shared/data]
        [--features enc.npz] [--layers 8,16,30] [--quick]

Same sources, rows, weights, annotator smoothing and protocol as ``scripts/train_refusal_detector.py`` (LOMO over
XSTest v2's three models, C and the XSTest weight chosen by an inner LOMO over the two training models); the
difference is the features. Each response's opening (its first 60 words, cut to ``MAX_TOKENS`` tokens) goes
through the embedded SmolLM2-135M-Instruct, frozen; the hidden states of one layer are averaged over the
tokens after the first (the first token's state depends on that token alone and carries the large activations
of attention sinks), standardised with the weak sources' mean and deviation and scaled to unit expected norm.
Two classifiers are compared, each with its layer chosen by the inner LOMO too:

- ``encoder``: a logistic regression on those features alone;
- ``lexical+encoder``: the shipped detector's features (``fedsafe.evaluation.refusal.features``) beside them.

Prints, per held-out model: the inner LOMO kappa of every layer (a spread across layers says the features
separate writers as much as refusals), the choice, and the outer accuracy / F1 with their intervals. The
features of ~10,000 texts take ~11 minutes on two idle cores (``--features`` saves and reuses them). This is
a measurement, not a training script: nothing is written into the package (docs/refusal_detector.md says why).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_refusal_detector as T  # noqa: E402  (same sources, weights and selection)

from fedsafe.evaluation import refusal as rd  # noqa: E402

MAX_TOKENS = 64
BATCH = 64


def pooled_states(texts: list[str], layers: list[int], model, tokenizer) -> np.ndarray:
    """``[n, len(layers), hidden]``: each layer's states averaged over the opening's tokens after the first."""
    import torch

    enc = [tokenizer(rd._opening(t), add_special_tokens=False)["input_ids"][:MAX_TOKENS]
           for t in texts]
    enc = [e if e else [tokenizer.eos_token_id] for e in enc]
    out = np.zeros((len(texts), len(layers), model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(e) for e in enc], kind="stable")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for s in range(0, len(order), BATCH):
        idx = order[s:s + BATCH]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # right padding: a causal model's states of real tokens ignore it
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            mask[r, :len(enc[i])] = 1
        with torch.inference_mode():
            states = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.clone()
        keep[:, 0] = torch.where(mask.sum(1) > 1, 0, 1)  # drop the first token unless it is the only one
        w = keep.unsqueeze(-1).float()
        for j, layer in enumerate(layers):
            out[idx, j] = ((states[layer] * w).sum(1) / w.sum(1)).numpy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=T.default_data_dir())
    ap.add_argument("--features", type=Path, help="an .npz to reuse (when it exists) or write the features to")
    ap.add_argument("--layers", default="8,16,30", help="hidden-state layers to try (0 = embeddings)")
    ap.add_argument("--quick", action="store_true", help="300 rows per source, 200 bootstrap resamples")
    args = ap.parse_args(argv)
    from scipy import sparse

    layers = [int(x) for x in args.layers.split(",")]
    started = time.time()
    base = T.load_sources(args.data, 300 if args.quick else T.MAX_ROWS_PER_SOURCE)
    xs = T.load_xstest(args.data)
    groups = {name: texts for name, (texts, _) in base.items()} | {m: xs[m]["texts"] for m in T.XSTEST_MODELS}
    if args.features and args.features.exists():
        saved = np.load(args.features)
        feats = {k: saved[k] for k in groups}
        if list(saved["layers"]) != layers:
            raise SystemExit(f"{args.features} holds layers {list(saved['layers'])}, not {layers}")
    else:
        from fedsafe.models import load_base_model

        loaded = load_base_model("embedded", device="cpu")
        loaded.model.eval()
        feats = {}
        for name, texts in groups.items():
            feats[name] = pooled_states(texts, layers, loaded.model, loaded.tokenizer)
            print(f"  encoded {name}: {len(texts)} texts ({time.time() - started:.0f} s)", flush=True)
        if args.features:
            np.savez(args.features, layers=np.asarray(layers), **feats)
    weak = np.concatenate([feats[n] for n in base])
    mu, sd = weak.mean(0), weak.std(0) + 1e-6
    dim = weak.shape[2]
    lexical = {n: rd.features(t) for n, t in groups.items()}
    n_boot = 200 if args.quick else 2000

    def parts(kind: str, j: int):
        def x(name):
            dense = sparse.csr_matrix((feats[name][:, j] - mu[j]) / sd[j] / np.sqrt(dim))
            return dense if kind == "encoder" else sparse.hstack([lexical[name], dense], format="csr")
        base_parts = [(x(n), y) for n, (_, y) in base.items()]
        test = {m: (x(m), xs[m]["labels"]) for m in T.XSTEST_MODELS}
        train = {m: T.smoothed(test[m][0], xs[m]["labels"], xs[m]["annotations"]) for m in T.XSTEST_MODELS}
        return base_parts, test, train

    print("\n| classifier | held-out model | inner LOMO kappa per layer | chosen (layer, C, weight) | accuracy | F1 |")
    print("|---|---|---|---|---|---|")
    for kind in ("encoder", "lexical+encoder"):
        built = {layer: parts(kind, j) for j, layer in enumerate(layers)}
        for held in T.XSTEST_MODELS:
            others = [o for o in T.XSTEST_MODELS if o != held]
            inner = {}
            for layer, (bp, test, train) in built.items():
                inner[layer] = T.select(bp, {o: train[o] for o in others}, {o: test[o] for o in others})
            layer = max(inner, key=lambda k: inner[k][2])
            c, w, _ = inner[layer]
            bp, test, train = built[layer]
            det = T.lomo_fit(bp, train, held, c, w)
            a = rd.agreement(xs[held]["labels"], T.detect(det, test[held][0]), n_boot=n_boot, seed=T.SEED)
            spread = " / ".join(f"{k}: {v[2]:.3f}" for k, v in inner.items())
            print(f"| {kind} | {held} | {spread} | {layer}, {c:g}, {w:g} | {T.fmt(a['accuracy'])} | "
                  f"{T.fmt(a['f1'])} |", flush=True)
    print(f"\ntook {time.time() - started:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
