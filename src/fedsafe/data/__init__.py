"""Client data: sources -> role pools -> disjoint partitions -> tokenised examples."""

from __future__ import annotations

import logging

from fedsafe.config import DataSource, ExperimentConfig
from fedsafe.data.format import TokenizedExample, tokenize_rows
from fedsafe.data.partition import dirichlet_partition, iid_partition
from fedsafe.data.sources import Row, load_rows
from fedsafe.errors import DataError

log = logging.getLogger("fedsafe")


def load_pool(sources: list[DataSource], seed: int, generator_cache: dict | None = None) -> list[Row]:
    """Concatenate the rows of several sources."""
    rows: list[Row] = []
    for i, src in enumerate(sources):
        rows.extend(load_rows(src, seed=seed + i, generator_cache=generator_cache))
    return rows


def build_clients(cfg: ExperimentConfig, tokenizer, generator_cache: dict | None = None):
    """Build every client's tokenised data from the roles in ``cfg`` (ids client_00, client_01, ...)."""
    from fedsafe.data.client_data import ClientData

    clients: list[ClientData] = []
    next_id = 0
    for r_idx, role in enumerate(cfg.roles):
        pool = load_pool(role.data, seed=cfg.seed + 1000 * r_idx, generator_cache=generator_cache)
        per_client = role.samples_per_client or cfg.data.samples_per_client
        part_seed = cfg.seed + 7 * r_idx + 1
        if cfg.data.partition == "dirichlet":
            parts = dirichlet_partition([r.get("category") for r in pool], role.clients, per_client,
                                        cfg.data.dirichlet_alpha, part_seed)
        else:
            parts = iid_partition(len(pool), role.clients, per_client, part_seed)
        if len(parts[0]) < per_client:
            log.warning("role %s: pool of %d rows gives %d examples per client (asked %d)",
                        role.name, len(pool), len(parts[0]), per_client)
        for idx in parts:
            examples = tokenize_rows(tokenizer, [pool[i] for i in idx], cfg.data.max_length,
                                     cfg.data.system_prompt)
            if not examples:
                raise DataError(f"role {role.name!r}: a client has no example left after truncation to "
                                f"data.max_length={cfg.data.max_length}")
            clients.append(ClientData(f"client_{next_id:02d}", role.name, examples, role.is_malicious))
            next_id += 1
    return clients


def build_heldout(cfg: ExperimentConfig, tokenizer) -> list[TokenizedExample]:
    """Held-out examples for the loss before/after training (empty when none are configured)."""
    if not cfg.data.heldout:
        return []
    rows = load_pool(cfg.data.heldout, seed=cfg.seed + 99)[: cfg.data.heldout_max]
    return tokenize_rows(tokenizer, rows, cfg.data.max_length, cfg.data.system_prompt)
