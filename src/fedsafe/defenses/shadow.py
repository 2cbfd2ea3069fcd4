"""Server-side shadow clients: labelled LoRA updates the server makes itself, to fit the probe without an oracle.

Safe-FedLLM (Tao et al., ACL 2026) fits its probe on client updates labelled by the name of the dataset each
client trained on, which a real server never knows. Here the server plays both roles itself, each refit:

    for i in 1..B:  delta_i^+ = LocalTrainer.fit(benign shadow i,    global_t)    label 0
    for j in 1..M:  delta_j^- = LocalTrainer.fit(malicious shadow j, global_t)    label 1

Benign shadows train on data the server holds (normal + aligned rows), malicious shadows on unaligned rows
(from fedsafe's generation pipeline, a public dataset or a local file). Each shadow draws
``samples_per_shadow`` rows with a seed derived from (seed, round, label, i), and trains from the current
global adapter with the round's learning rate and the same local trainer (one in-memory model) as the real
clients, so its update lives in the same feature distribution. Everything is deterministic under the seed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from fedsafe.errors import ConfigError
from fedsafe.fl.client import ClientData, ClientResult, LocalTrainer, RoundConfig, derive_seed


class ShadowTrainer:
    """Runs the server's benign and malicious shadow clients from a global adapter and collects features."""

    def __init__(self, trainer: LocalTrainer, benign: list, malicious: list, *, benign_shadows: int = 4,
                 malicious_shadows: int = 4, samples_per_shadow: int = 32, steps: int | None = None,
                 seed: int = 0):
        if not benign or not malicious:
            raise ConfigError("probe: shadow training needs both benign and malicious examples "
                              f"(got {len(benign)} benign, {len(malicious)} malicious)")
        self.trainer = trainer
        self.pools = {0: list(benign), 1: list(malicious)}
        self.counts = {0: benign_shadows, 1: malicious_shadows}
        self.samples_per_shadow = samples_per_shadow
        self.steps = steps
        self.seed = seed

    @property
    def flat(self):
        """The LoRA layout of the shared model (fixes the probe's feature mask)."""
        return self.trainer.flat

    def shadow_clients(self, round_no: int) -> list[tuple[ClientData, int]]:
        """This round's shadow clients with labels (1 = malicious); seeded by (seed, round, label, i)."""
        out = []
        for label, count in self.counts.items():
            pool = self.pools[label]
            for i in range(count):
                rng = random.Random(derive_seed(self.seed, round_no, label, i))
                idx = rng.sample(range(len(pool)), min(self.samples_per_shadow, len(pool)))
                role = "malicious" if label else "benign"
                out.append((ClientData(f"shadow_{role}_{i:02d}", f"shadow_{role}", [pool[j] for j in idx],
                                       malicious=bool(label)), label))
        return out

    def run(self, global_vec: torch.Tensor, rc: RoundConfig) -> list[tuple[ClientResult, int]]:
        """Train every shadow client from ``global_vec``; returns (result, label) pairs."""
        shadow_rc = replace(rc, local_steps=self.steps or rc.local_steps, seed=derive_seed(self.seed, "shadow"),
                            algorithm="fedavg" if rc.algorithm == "scaffold" else rc.algorithm, scaffold_c=None)
        return [(self.trainer.fit(client, global_vec, shadow_rc, {}), label)
                for client, label in self.shadow_clients(rc.round)]

    def collect(self, global_vec: torch.Tensor, rc: RoundConfig,
                featurize: Callable[[ClientResult], np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        """Shadow feature rows ``X [m, dim]``, labels ``y [m]`` and timing, one shadow at a time (low memory)."""
        t0 = time.perf_counter()
        rows, labels = [], []
        losses = {0: [], 1: []}
        for result, label in self.run(global_vec, rc):
            x = featurize(result)
            rows.append(x)
            labels.extend([label] * len(x))
            losses[label].append(result.metrics["loss"])
        info = {"shadow_seconds": time.perf_counter() - t0, "shadows": sum(self.counts.values()),
                "shadow_loss_benign": float(np.mean(losses[0])), "shadow_loss_malicious": float(np.mean(losses[1]))}
        return np.concatenate(rows), np.asarray(labels), info


def build_shadow(cfg, trainer: LocalTrainer, generator_cache: dict | None = None) -> ShadowTrainer:
    """The shadow trainer of an experiment's ``probe:`` section (loads and tokenises its data once)."""
    from fedsafe.data import load_pool
    from fedsafe.data.format import tokenize_rows

    pc = cfg.probe
    for field in ("benign", "malicious"):
        if not getattr(pc, field):
            kind = "normal and aligned" if field == "benign" else "unaligned"
            raise ConfigError(f"aggregator.name={cfg.aggregator.name!r} needs probe.{field}: data sources of "
                              f"{kind} rows that the server holds, e.g. a local file or "
                              f"{{generate: {{kind: {'normal' if field == 'benign' else 'unaligned'}, n: 64}}}}")
    seed = pc.seed if pc.seed is not None else cfg.seed
    pools = {}
    for offset, field in enumerate(("benign", "malicious")):
        rows = load_pool(getattr(pc, field), seed + 5000 + 100 * offset, generator_cache)
        pools[field] = tokenize_rows(trainer.tokenizer, rows, cfg.data.max_length, cfg.data.system_prompt)
    return ShadowTrainer(trainer, pools["benign"], pools["malicious"], benign_shadows=pc.benign_shadows,
                         malicious_shadows=pc.malicious_shadows, samples_per_shadow=pc.samples_per_shadow,
                         steps=pc.steps, seed=seed)
