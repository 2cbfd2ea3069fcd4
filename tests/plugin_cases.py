"""One small tiny-model experiment per built-in plug-in, and a fingerprint of what it leaves behind.

``tests/test_plugin_equivalence.py`` runs every case and compares it with ``tests/data/plugin_reference.json``,
which was written by the code *before* attacks and defenses became plug-ins (issue 16)::

    PYTHONPATH=<checkout of the old commit>/src .venv/bin/python tests/plugin_cases.py tests/data/plugin_reference.json

A fingerprint is the L2 norm of each saved adapter and its dot products with three fixed random directions,
plus the count of each metrics record type. Each case is built so that its plug-in moves the adapter far more
than the tolerance (checked against the plain case), so a plug-in that silently stops acting fails.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

BASE = ["model.name=tiny", "seed=0", "name=p", "fl.rounds=2", "fl.local_steps=3", "fl.batch_size=2",
        "data.samples_per_client=8", "data.max_length=96", "roles.0.clients=3", "fl.clients_per_round=3",
        "fl.lr=0.01", "eval.helpfulness_proxy=false", "eval.normal_prompts=null"]
MALICIOUS = ("roles=[{name: benign, clients: 2, data: [{path: 'starter:train', categories: [normal]}]}, "
             "{name: malicious, clients: 1, data: [{path: 'starter:train', categories: [aligned]}]}]")

CASES: dict[str, list[str]] = {
    "plain": [],
    "data_poisoning": [MALICIOUS],
    "canaries_privacy": ["privacy.enabled=true", "privacy.n_zero_input=2", "privacy.max_new_tokens=4",
                         "privacy.n_partial=2", "privacy.n_mia=4", "privacy.variants=[plain]",
                         "privacy.canaries={n: 1, repeats: 4, digits: 3, n_candidates: 10, n_samples: 1}",
                         "data.heldout=[{path: 'starter:heldout'}]", "data.max_length=128"],
    "dp_client_level": ["dp.client_level=true", "dp.clip_norm=0.05", "dp.noise_multiplier=1.0"],
    "dp_local": ["dp.local=true", "dp.local_clip_norm=0.5", "dp.local_noise_multiplier=1.0"],
    "constrained": ["constrained.l2_mu=1000", "constrained.kl_beta=50"],
    "secure_agg": ["secure_agg.enabled=true", "secure_agg.prune_start=0.5", "secure_agg.prune_end=0.5"],
    "probe": [MALICIOUS, "aggregator.name=probe", "probe.mode=probability",
              "probe.benign=[{path: 'starter:train', categories: [normal]}]",
              "probe.malicious=[{path: 'starter:train', categories: [aligned]}]",
              "probe.benign_shadows=2", "probe.malicious_shadows=2", "probe.samples_per_shadow=8"],
    "local_probing": [MALICIOUS, f"baselines.probing.prompts={SHARED / 'advbench' / 'harmful_behaviors.csv'}",
                      "baselines.probing.enabled=true", "baselines.probing.n_prompts=2",
                      "baselines.probing.max_new_tokens=4", "baselines.probing.criterion=absolute",
                      "baselines.probing.threshold=0.0"],
    "posthoc": ["posthoc.enabled=true", "posthoc.aligned=[{path: 'starter:train', categories: [aligned]}]",
                "posthoc.normal=[{path: 'starter:train', categories: [normal]}]", "posthoc.n_samples=8",
                "posthoc.steps=3", "posthoc.lr=0.01"],
    "personalization": ["baselines.personalization.enabled=true", "baselines.personalization.steps=3"],
}


def fingerprint_vec(vec: torch.Tensor) -> dict:
    v = vec.double()
    gen = torch.Generator().manual_seed(1234)
    dirs = torch.randn(3, v.numel(), generator=gen, dtype=torch.float64)
    return {"norm": float(v.norm()), "dots": [float(x) for x in dirs @ v]}


def fingerprint_run(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    adapters = {}
    for f in sorted((run_dir / "adapters").rglob("adapter_model.safetensors")):
        tag = str(f.parent.relative_to(run_dir / "adapters"))
        if tag.startswith("round_"):
            continue
        t = load_file(str(f))
        adapters[tag] = fingerprint_vec(torch.cat([t[k].reshape(-1).float() for k in sorted(t)]))
    types = (json.loads(line)["type"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    records = Counter(t for t in types if t != "train")  # per-step train/loss records came after the reference
    return {"adapters": adapters, "records": dict(sorted(records.items()))}


def run_case(name: str, out_dir: Path) -> dict:
    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    torch.set_num_threads(1)
    cfg = load_config(None, [*BASE, f"output_dir={out_dir}", f"name={name}", *CASES[name]])
    res = run_experiment(cfg, progress=False)
    return fingerprint_run(Path(res.run_dir))


def close(a: dict, b: dict, rtol: float = 0.02) -> str | None:
    """None when fingerprint ``a`` matches reference ``b``; else what differs."""
    if a["records"] != b["records"]:
        return f"metrics records {a['records']} != {b['records']}"
    if sorted(a["adapters"]) != sorted(b["adapters"]):
        return f"adapters {sorted(a['adapters'])} != {sorted(b['adapters'])}"
    for tag, fa in a["adapters"].items():
        fb = b["adapters"][tag]
        tol = rtol * max(fb["norm"], 1e-12)
        diffs = [abs(fa["norm"] - fb["norm"])] + [abs(x - y) for x, y in zip(fa["dots"], fb["dots"])]
        if max(diffs) > tol:
            return f"adapter {tag}: {fa} vs reference {fb} (tolerance {tol:.3g})"
    return None


if __name__ == "__main__":
    import tempfile

    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    ref = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ref[name] = run_case(name, Path(tmp))
            print(name, json.dumps(ref[name]), flush=True)
    out.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
