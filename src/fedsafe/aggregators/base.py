"""The aggregator contract shared by every rule: stacked updates in, aggregate and client weights out."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsafe.aggregators.requirements import validate_f  # noqa: F401  (re-exported for the rules)

log = logging.getLogger("fedsafe")


@dataclass
class RoundContext:
    """What a stateful rule may use before aggregation (see :meth:`Aggregator.prepare`).

    ``truth`` (client id -> malicious) is the simulator's ground truth: rules may log metrics against it
    (the probe's ROC-AUC) but must never decide with it. ``shadow`` is the server's shadow-training
    service (:class:`fedsafe.defenses.safe_fedllm_probe.shadow.ShadowTrainer`) when the experiment built one.
    ``client_extra`` is filled by the server with each client's ``ClientResult.extra`` right before
    aggregation (e.g. the step-level reports of the probe). ``flat`` is the model's LoRA layout
    (:class:`fedsafe.fl.params.FlatLoRA`) when the server has one (LASA's layers).
    """

    round: int
    global_vec: torch.Tensor
    round_config: Any = None
    truth: dict[str, bool] | None = None
    shadow: Any = None
    client_extra: dict[str, dict] = field(default_factory=dict)
    flat: Any = None


class AggregationResult:
    """An aggregate update ``[d]``, the effective weight of each client ``[n]`` (0 = excluded) and details.

    ``client_weights`` may be given as a zero-argument callable: a rule whose weights cost more than its
    aggregate (the median's per-client bookkeeping, issue 32) computes them on first access only, e.g. for the
    stealth analysis; the server reads them every round, a benchmark of the aggregate alone never does.
    """

    def __init__(self, update: torch.Tensor, client_weights, info: dict | None = None,
                 received: torch.Tensor | None = None):
        self.update = update
        self._client_weights = client_weights
        self.info = {} if info is None else info
        #: ``[n, d]`` the updates the server received, where a ``server_view`` hook replaced the ones it was given
        #: (a full-knowledge adaptive attack crafts the malicious clients' updates there); None: the ones given.
        #: The round's stealth statistics are computed from these (fedsafe.fl.loop)
        self.received = received

    @property
    def client_weights(self) -> torch.Tensor:
        if callable(self._client_weights):
            self._client_weights = self._client_weights()
        return self._client_weights

    @client_weights.setter
    def client_weights(self, value) -> None:
        self._client_weights = value

    @property
    def weights_pending(self) -> bool:
        """Whether the client weights are still to be computed (nobody has asked for them yet)."""
        return callable(self._client_weights)

    def __repr__(self) -> str:
        weights = "<pending>" if self.weights_pending else self._client_weights
        return f"AggregationResult(update={self.update!r}, client_weights={weights!r}, info={self.info!r})"


class Aggregator:
    """Base class: ``agg(updates[n, d], num_samples[n], client_ids) -> AggregationResult``.

    Stateless rules implement :meth:`aggregate`. Stateful rules (FoolsGold's history) keep their state
    keyed by client id and expose it through :meth:`state_dict` / :meth:`load_state_dict` so that a
    resumed run continues with the same state.
    """

    name = "aggregator"
    #: True when the rule needs individual plaintext updates (refused under secure aggregation)
    needs_plaintext = True

    def __call__(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        if updates.ndim != 2:
            raise ValueError(f"{self.name}: updates must be [n, d], got shape {tuple(updates.shape)}")
        n = updates.shape[0]
        if num_samples.shape != (n,) or len(client_ids) != n:
            raise ValueError(f"{self.name}: {n} updates but {tuple(num_samples.shape)} sample counts and "
                             f"{len(client_ids)} client ids")
        return self.aggregate(updates.float(), num_samples.float(), list(client_ids))

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        raise NotImplementedError

    def prepare(self, context: RoundContext):
        """Hook at the start of a round, before local training; returns the RoundConfig to send.

        Stateless rules ignore it. The probe uses it for shadow training and to ask for step reports.
        """
        return context.round_config

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def sample_weights(num_samples: torch.Tensor) -> torch.Tensor:
    """Normalised sample-count weights (uniform when all counts are zero)."""
    total = num_samples.sum()
    if total <= 0:
        return torch.full_like(num_samples, 1.0 / len(num_samples))
    return num_samples / total


# --- helpers shared by the robust rules ------------------------------------------------------------

#: elements of an [n, chunk] working block; bounds the extra memory of column-wise rules (~64 MiB floats)
CHUNK_ELEMS = 1 << 24


def column_chunks(n: int, d: int, per_column: int = 1, budget: int = CHUNK_ELEMS):
    """Slices over the d coordinates so that an ``[n * per_column, chunk]`` block stays within ``budget``."""
    step = max(1, budget // max(1, n * per_column))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def check_f(rule: str, f: int, n: int) -> None:
    """Warn when the assumed number of attackers f is at least half the clients of this round."""
    if f >= n / 2:
        msg = (f"{rule}: aggregator.params.f={f} is at least half of the {n} clients this round; no robust "
               f"rule can separate a malicious majority")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)


def sort_columns(block: torch.Tensor) -> torch.Tensor:
    """Sort each column of ``[n, c]`` (numpy's sort along axis 0 is several times faster than
    ``torch.sort(dim=0)`` or an argsort on CPU)."""
    if block.is_cuda:
        return torch.sort(block, dim=0).values
    return torch.from_numpy(np.sort(block.numpy(), axis=0))


def window_shares(block: torch.Tensor, sorted_block: torch.Tensor, start, stop) -> torch.Tensor:
    """For each client, the number of sorted places ``[start, stop)`` its values fill, summed over columns.

    ``block`` is ``[n, c]``, ``sorted_block`` its column-wise sort, ``start``/``stop`` ints or ``[c]`` long
    tensors. A client whose value lies between the window's end values fills one place; clients tied on an
    end value share the places that value occupies inside the window equally, so the result does not
    depend on the order of the clients (an argsort would hand ties to the lower index).
    """
    n, c = block.shape
    start = torch.as_tensor(start, dtype=torch.long, device=block.device).expand(c)
    stop = torch.as_tensor(stop, dtype=torch.long, device=block.device).expand(c)
    lo = sorted_block.gather(0, start[None])
    hi = sorted_block.gather(0, (stop - 1)[None])
    return window_shares_between(block, lo, hi, start, stop)


def window_shares_between(block: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, start, stop) -> torch.Tensor:
    """:func:`window_shares` from the window's end values ``lo``, ``hi`` (``[1, c]``: the sorted places
    ``start`` and ``stop - 1`` of each column) instead of the whole sorted block."""
    n, c = block.shape
    one_place = isinstance(start, int) and isinstance(stop, int) and stop - start == 1
    start = torch.as_tensor(start, dtype=torch.long, device=block.device).expand(c)
    stop = torch.as_tensor(stop, dtype=torch.long, device=block.device).expand(c)
    if one_place:  # an odd median: the window is one value, one comparison finds who holds it
        inside = block == lo
    else:
        inside = (block >= lo) & (block <= hi)
    # without ties at the window's ends exactly stop - start values lie in [lo, hi]: the fast path
    tied = inside.sum(dim=0) != (stop - start)
    shares = inside.sum(dim=1).double()
    if bool(tied.any()):
        cols = tied.nonzero()[:, 0]
        shares -= inside[:, cols].sum(dim=1).double()
        shares += _tied_window_shares(block[:, cols], lo[:, cols], hi[:, cols], start[cols], stop[cols])
    return shares


def _tied_window_shares(block, lo, hi, start, stop) -> torch.Tensor:
    """The exact count of :func:`window_shares` for columns with ties on an end value."""
    shares = ((block > lo) & (block < hi)).sum(dim=1).double()
    for value, skip in ((lo, None), (hi, hi == lo)):
        eq = block == value
        n_eq = eq.sum(dim=0)
        n_lt = (block < value).sum(dim=0)
        places = (torch.minimum(n_lt + n_eq, stop) - torch.maximum(n_lt, start)).clamp_min(0)
        per_client = places.double() / n_eq.clamp_min(1)
        if skip is not None:  # both ends hold the same value: already counted with the lower end
            per_client = torch.where(skip[0], torch.zeros_like(per_client), per_client)
        shares += (eq.double() * per_client).sum(dim=1)
    return shares


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, n]`` (float64) via chunked Gram matrices of centred updates.

    Distances do not change under translation, so the updates are first centred on the one with the median
    L2 norm: a typical update rather than the mean, which one huge outlier would drag away. That keeps the
    float32 cancellation in ``|a|^2 + |b|^2 - 2ab`` small relative to the distances among typical updates
    (a float64 Gram is ~7x slower on CPU); chunk Grams are accumulated in float64.
    """
    n, d = updates.shape
    norms = updates.norm(dim=1)
    centre = updates[torch.sort(norms, stable=True).indices[(n - 1) // 2]]
    gram = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d):
        block = updates[:, cols] - centre[cols]
        gram += (block @ block.T).double()
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def gram_matrix(updates: torch.Tensor) -> torch.Tensor:
    """``updates @ updates.T`` as float64 ``[n, n]``, from float32 chunk products (bounded extra memory)."""
    n, d = updates.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d):
        block = updates[:, cols]
        gram += (block @ block.T).double()
    return gram


def median_of_sorted(vals: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Median of values already sorted along ``dim``; for an even count the midpoint of the two middle ones."""
    m = vals.shape[dim]
    lo = vals.select(dim, (m - 1) // 2)
    hi = vals.select(dim, m // 2)
    return lo if m % 2 else (lo + hi) / 2
