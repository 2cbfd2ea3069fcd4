"""Split a role's data pool across its clients: IID or Dirichlet(alpha) over a category field.

Clients never share an example (disjoint splits). Dirichlet non-IID follows the usual FL recipe
(Hsu et al. 2019): per category, client proportions are drawn from Dir(alpha).
"""

from __future__ import annotations

import numpy as np

from fedsafe.errors import DataError


def iid_partition(n_items: int, n_clients: int, per_client: int, seed: int) -> list[list[int]]:
    """Shuffle and deal ``per_client`` disjoint indices to each client (fewer if the pool is short)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items)
    per = min(per_client, n_items // n_clients)
    if per == 0:
        raise DataError(f"a pool of {n_items} examples cannot give each of {n_clients} clients one example")
    return [order[i * per: (i + 1) * per].tolist() for i in range(n_clients)]


def dirichlet_partition(categories: list, n_clients: int, per_client: int, alpha: float,
                        seed: int) -> list[list[int]]:
    """Non-IID split: each category's items are dealt to clients with Dir(alpha) proportions."""
    if any(c is None for c in categories):
        raise DataError("Dirichlet partitioning needs a category for every row: set category_field on the source")
    rng = np.random.default_rng(seed)
    labels = np.array([str(c) for c in categories])
    clients: list[list[int]] = [[] for _ in range(n_clients)]
    for cat in np.unique(labels):
        idx = np.flatnonzero(labels == cat)
        rng.shuffle(idx)
        props = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
        for c, part in enumerate(np.split(idx, cuts)):
            clients[c].extend(part.tolist())
    out = []
    for c in range(n_clients):
        items = np.array(clients[c], dtype=int)
        rng.shuffle(items)
        out.append(items[:per_client].tolist())
    if any(len(o) == 0 for o in out):
        empty = [i for i, o in enumerate(out) if not o]
        raise DataError(f"Dirichlet(alpha={alpha}) left clients {empty} without data; raise alpha or add data")
    return out
