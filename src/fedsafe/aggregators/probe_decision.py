"""Decision rules of the shadow probe: when is a client's score high enough to flag it, without oracle labels?

The probe (:mod:`fedsafe.aggregators.probe`) gives each client update a logit ``l_k = w^T x_k + b`` and a
probability ``p_k = sigmoid(l_k)``. Safe-FedLLM flags ``p_k >= 0.8``, which assumes ``p`` is calibrated for the
real clients. A probe fitted on the server's own shadow updates ranks the clients well but its probabilities
carry the shadows' scale, not the clients' (issue 19: per-round AUC 1.000, yet no client ever reached 0.8).
Each rule below states the one assumption it makes instead; none reads the clients' true roles.

    fixed       flag p_k >= tau                                     (``probe.threshold``; Safe-FedLLM)
                assumes: the probe's probabilities are calibrated on the real clients' updates.
    fpr         flag l_k > q, q = the ceil((m+1)(1-alpha))-th smallest of the m held-out benign shadow logits
                (split-conformal threshold, Vovk et al. 2005; Angelopoulos & Bates 2021, alpha = ``probe.fpr``)
                assumes: the benign clients' logits are exchangeable with the held-out benign shadows'
                (same data family, same local training: see ``probe.match_clients``). Then the benign
                false-positive rate is at most alpha; with m < 1/alpha - 1 scores no order statistic gives
                that, q is the largest held-out benign logit and the bound is 1/(m+1) (logged).
    mad         flag z_k >= z, z_k = 0.6745 (l_k - median(l)) / MAD(l) over the round's clients
                (modified z-score, Iglewicz & Hoaglin 1993; MAD = 0 falls back to 1.2533 x mean absolute
                deviation, both 0 flags nobody; ``probe.z``, 3.5 by their recommendation)
                assumes: the benign clients are a majority of the round and their logits are unimodal;
                scale-free (any affine map of the logits gives the same flags), needs no held-out shadows.
    gap         sort the round's logits; among the splits whose upper group is a strict minority, take the
                largest consecutive gap; flag the upper group if gap / range >= ``probe.min_gap``
                (a two-component split; gap / range is Dixon's Q ratio, Dean & Dixon 1951)
                assumes: as ``mad``, and that attackers form a tight group above the benign clients.
    calibrated  p'_k = c(l_k) with c fitted on held-out shadow logits, flag p'_k >= tau
                Platt scaling (Platt 1999, with his smoothed targets (N+ + 1)/(N+ + 2) and 1/(N- + 2), slope
                constrained >= 0) or isotonic regression (Zadrozny & Elkan 2002), ``probe.calibration``
                assumes: the held-out shadows' class-conditional logits match the clients'; then
                ``threshold`` means what Safe-FedLLM's 0.8 assumes. c is non-decreasing, so it never reorders.
                With few held-out shadows Platt's smoothed targets cap p' near (N+ + 1)/(N+ + 2) at the
                held-out malicious scores (3/4 with N+ = 2), so tau = 0.8 then fires only above them; isotonic
                interpolates between the classes' held-out scores instead.

Held-out shadows (``fpr``, ``calibrated``): a share ``probe.holdout`` of each class's shadow clients is kept
out of the probe's fit and scored by the fitted probe, at every refit (so the threshold is never set on
training scores and follows the drift of the global model). Each held-out shadow gives one score, computed
exactly as a client's: its final update's logit at ``probe.level=update``, the logit of its steps' mean
probability at ``probe.level=step`` (never one score per local step: steps of one shadow share its
trajectory, so per-step scores are neither exchangeable with each other nor with the clients' scores, and
issue 28 measured a benign FPR of 0.278 under a logged ``fpr_bound`` of 0.049). ``m`` below counts held-out
benign shadow *clients*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedsafe.errors import ConfigError

DECISIONS = ("fixed", "fpr", "mad", "gap", "calibrated")
NEEDS_HOLDOUT = ("fpr", "calibrated")


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@dataclass
class Decision:
    """One round's decision: which clients are flagged, the threshold in logit units (None: no threshold),
    the per-client probability the soft weighting modes use, and what the rule logs."""

    flagged: np.ndarray
    threshold_logit: float | None
    probability: np.ndarray
    info: dict = field(default_factory=dict)


class DecisionRule:
    """A rule maps the round's probe logits to flags; ``refit`` sees held-out shadow logits after each fit."""

    name = "rule"
    needs_holdout = False

    def refit(self, benign: np.ndarray, malicious: np.ndarray) -> dict:
        """Held-out shadow logits (benign, malicious) of the probe just fitted; returns what to log."""
        return {}

    @property
    def ready(self) -> bool:
        return True

    def decide(self, logits: np.ndarray) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedThreshold(DecisionRule):
    """Safe-FedLLM: flag p >= tau (assumes calibrated probabilities)."""

    name = "fixed"

    def __init__(self, threshold: float = 0.8):
        self.threshold = float(threshold)

    def decide(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        p = _sigmoid(logits)
        return Decision(p >= self.threshold, _logit(self.threshold), p, {"threshold_probability": self.threshold})


class BenignFPR(DecisionRule):
    """Split-conformal threshold on held-out benign shadow logits at a target false-positive rate.

    Split conformal prediction (Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random World", 2005;
    Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021): if the m calibration scores
    and a benign client's score are exchangeable, flagging scores above the ceil((m+1)(1-alpha))-th smallest
    calibration score has false-positive rate <= 1 - ceil((m+1)(1-alpha))/(m+1) <= alpha, marginally over the
    calibration draw. ``refit`` must therefore receive one score per held-out shadow client, computed with
    the same statistic the clients are scored on (the probe does this at both levels)."""

    name = "fpr"
    needs_holdout = True

    def __init__(self, fpr: float = 0.05):
        self.fpr = float(fpr)
        self.threshold: float | None = None
        self.info: dict = {}

    @property
    def ready(self) -> bool:
        return self.threshold is not None

    def refit(self, benign, malicious):
        s = np.sort(np.asarray(benign, dtype=np.float64))
        m = len(s)
        if m == 0:
            raise ValueError("probe.decision=fpr: no held-out benign shadow score")
        k = math.ceil((m + 1) * (1 - self.fpr))
        guaranteed = k <= m
        self.threshold = float(s[k - 1] if guaranteed else s[-1])
        bound = (1 - k / (m + 1)) if guaranteed else 1 / (m + 1)
        mal = np.asarray(malicious, dtype=np.float64)
        self.info = {"benign_heldout": m, "target_fpr": self.fpr, "fpr_bound": bound, "guaranteed": guaranteed,
                     "heldout_tpr": float((mal > self.threshold).mean()) if len(mal) else None}
        return dict(self.info)

    def decide(self, logits):
        if self.threshold is None:
            raise RuntimeError("probe.decision=fpr: no threshold yet (it is set at the first refit)")
        logits = np.asarray(logits, dtype=np.float64)
        return Decision(logits > self.threshold, self.threshold, _sigmoid(logits), dict(self.info))

    def state_dict(self):
        return {"threshold": self.threshold, "info": self.info}

    def load_state_dict(self, state):
        self.threshold = state.get("threshold")
        self.info = dict(state.get("info") or {})


class RobustZ(DecisionRule):
    """Within-round modified z-score of the logits (median / MAD); scale-free, no held-out shadows."""

    name = "mad"

    def __init__(self, z: float = 3.5):
        self.z = float(z)

    def decide(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        med = float(np.median(logits))
        dev = np.abs(logits - med)
        mad = float(np.median(dev))
        if mad > 0:
            scale = mad / 0.6745
        else:  # Iglewicz & Hoaglin: more than half the scores tie; use the mean absolute deviation
            scale = 1.253314 * float(dev.mean())
        if scale <= 0:
            return Decision(np.zeros(len(logits), dtype=bool), None, _sigmoid(logits),
                            {"median": med, "scale": 0.0})
        zscores = (logits - med) / scale
        thr = med + self.z * scale
        return Decision(zscores >= self.z, thr, _sigmoid(logits),
                        {"median": med, "scale": scale, "z": {i: float(v) for i, v in enumerate(zscores)}})


class TwoGroupGap(DecisionRule):
    """Two-component split of the round's logits at the largest gap that leaves the upper group a minority."""

    name = "gap"

    def __init__(self, min_gap: float = 0.5):
        self.min_gap = float(min_gap)

    def decide(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        n = len(logits)
        none = Decision(np.zeros(n, dtype=bool), None, _sigmoid(logits), {})
        if n < 3:
            none.info["reason"] = "fewer than 3 clients"
            return none
        order = np.sort(logits)
        span = float(order[-1] - order[0])
        if span <= 0:
            return none
        max_upper = (n - 1) // 2  # the upper group must be a strict minority
        best, cut = -1.0, None
        for upper in range(1, max_upper + 1):
            gap = float(order[n - upper] - order[n - upper - 1])
            if gap > best:
                best, cut = gap, upper
        ratio = best / span
        info = {"gap_ratio": ratio, "upper": cut}
        if ratio < self.min_gap:
            return Decision(np.zeros(n, dtype=bool), None, _sigmoid(logits), info)
        thr = 0.5 * float(order[n - cut] + order[n - cut - 1])
        return Decision(logits > thr, thr, _sigmoid(logits), info)


class Calibrated(DecisionRule):
    """Platt or isotonic calibration of the logits on held-out shadows, then the fixed threshold."""

    name = "calibrated"
    needs_holdout = True

    def __init__(self, threshold: float = 0.8, method: str = "platt"):
        if method not in ("platt", "isotonic"):
            raise ConfigError(f"probe.calibration must be platt or isotonic, got {method!r}")
        self.threshold = float(threshold)
        self.method = method
        self.platt: tuple[float, float] | None = None
        self.iso_x: np.ndarray | None = None
        self.iso_y: np.ndarray | None = None
        self.info: dict = {}

    @property
    def ready(self) -> bool:
        return self.platt is not None or self.iso_x is not None

    def refit(self, benign, malicious):
        b = np.asarray(benign, dtype=np.float64)
        m = np.asarray(malicious, dtype=np.float64)
        if len(b) == 0 or len(m) == 0:
            raise ValueError("probe.decision=calibrated: held-out shadows of both classes are needed")
        x = np.concatenate([b, m])
        y = np.concatenate([np.zeros(len(b)), np.ones(len(m))])
        if self.method == "platt":
            self.platt = platt_fit(x, y)
            self.info = {"method": "platt", "a": self.platt[0], "b": self.platt[1]}
        else:
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
            self.iso_x, self.iso_y = np.asarray(iso.X_thresholds_, float), np.asarray(iso.y_thresholds_, float)
            self.info = {"method": "isotonic", "knots": int(len(self.iso_x))}
        self.info["heldout"] = int(len(x))
        return dict(self.info)

    def calibrate(self, logits) -> np.ndarray:
        """Calibrated probabilities (non-decreasing in the logit)."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.platt is not None:
            a, b = self.platt
            return _sigmoid(a * logits + b)
        if self.iso_x is None:
            raise RuntimeError("probe.decision=calibrated: not calibrated yet (done at the first refit)")
        return np.interp(logits, self.iso_x, self.iso_y)

    def threshold_logit(self) -> float | None:
        """The logit at which the calibrated probability reaches ``threshold`` (None: never)."""
        if self.platt is not None:
            a, b = self.platt
            return (_logit(self.threshold) - b) / a if a > 0 else None
        hit = np.flatnonzero(self.iso_y >= self.threshold)
        if len(hit) == 0:
            return None
        j = int(hit[0])
        if j == 0:
            return float(self.iso_x[0])
        x0, x1, y0, y1 = self.iso_x[j - 1], self.iso_x[j], self.iso_y[j - 1], self.iso_y[j]
        return float(x0 + (self.threshold - y0) * (x1 - x0) / (y1 - y0))

    def decide(self, logits):
        p = self.calibrate(logits)
        return Decision(p >= self.threshold, self.threshold_logit(), p,
                        {**self.info, "threshold_probability": self.threshold})

    def state_dict(self):
        return {"platt": self.platt, "iso_x": self.iso_x, "iso_y": self.iso_y, "info": self.info}

    def load_state_dict(self, state):
        self.platt = tuple(state["platt"]) if state.get("platt") is not None else None
        self.iso_x, self.iso_y = state.get("iso_x"), state.get("iso_y")
        self.info = dict(state.get("info") or {})


def platt_fit(scores, labels, iterations: int = 100) -> tuple[float, float]:
    """Platt scaling ``p = sigmoid(a s + b)`` by Newton's method on his smoothed targets, with ``a >= 0``.

    Targets (Platt 1999): positives (N+ + 1)/(N+ + 2), negatives 1/(N- + 2), so a separable held-out set gives
    a finite slope. A best slope below 0 (the probe ranks the held-out shadows backwards) is clamped to 0:
    a constant probability, the smoothed base rate, so calibration never inverts the probe's order.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 0.0, math.log((n_pos + 1) / (n_neg + 1))
    for _ in range(iterations):
        p = _sigmoid(a * s + b)
        g = np.array([np.sum((p - t) * s), np.sum(p - t)])
        w = p * (1 - p)
        h = np.array([[np.sum(w * s * s), np.sum(w * s)], [np.sum(w * s), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    if a < 0:
        return 0.0, _logit(float(t.mean()))
    return float(a), float(b)


def build_rule(config) -> DecisionRule:
    """The decision rule of a :class:`fedsafe.defenses.safe_fedllm_probe.config.ProbeConfig`."""
    name = getattr(config, "decision", "fixed")
    if name == "fixed":
        return FixedThreshold(config.threshold)
    if name == "fpr":
        return BenignFPR(config.fpr)
    if name == "mad":
        return RobustZ(config.z)
    if name == "gap":
        return TwoGroupGap(config.min_gap)
    if name == "calibrated":
        return Calibrated(config.threshold, config.calibration)
    raise ConfigError(f"probe.decision must be one of {', '.join(DECISIONS)}, got {name!r}")


def holdout_share(config) -> float:
    """The share of each class's shadows kept out of the fit (``probe.holdout``; auto: 0.5 when needed)."""
    if config.holdout is not None:
        return float(config.holdout)
    return 0.5 if config.decision in NEEDS_HOLDOUT else 0.0
