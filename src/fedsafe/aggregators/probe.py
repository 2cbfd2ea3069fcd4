"""Probe filter: a linear probe on LoRA updates flags malicious clients before aggregation.

Paper: Tao et al., "Safe-FedLLM: Delving into the Safety of Federated Large Language Models" (ACL 2026),
public code dmqx/Safe-FedLLM. For client k with update delta_k in round t:

    features   x_k = P(delta_k[M]) / ||P(delta_k[M])||_2
               M: LoRA B of the first transformer layer by default (``probe.features``); P: optional seeded
               Gaussian random projection to ``project_dim``
    probe      p_k = sigmoid(w^T x_k + b), logistic regression (scikit-learn) fitted on *shadow* updates
    decide     flag_k from the logit l_k = w^T x_k + b by ``probe.decision`` (:mod:`fedsafe.aggregators.probe_decision`):
               fixed p_k >= tau (Safe-FedLLM, tau = ``threshold``, 0.8), fpr (conformal threshold on held-out
               benign shadows), mad / gap (within-round outlier tests), calibrated (Platt / isotonic, then tau)
    weight     exclude:      s_k = 1 - flag_k
               probability:  s_k = 1 - p_k   (p_k calibrated under ``decision=calibrated``)
               trust:        a_k <- gamma a_k + (1 - p_k),  b_k <- gamma b_k + p_k,  s_k = a_k / (a_k + b_k)
                             (Beta trust per client id, a_k = b_k = 1 before its first round; gamma = ``decay``)
               soft modes:   s_k < ``min_weight`` -> s_k = 0
    skip       mean_k s_k < ``skip_below``  ->  the round is skipped (zero update, all weights 0)
    aggregate  ``probe`` alone:  Delta = sum_k n_k s_k delta_k / sum_k n_k s_k

Composition ``probe+<rule>`` (so the probe's weights are never silently ignored):
  1. clients with s_k = 0 are removed before the inner rule runs;
  2. if the inner rule's output is the weighted mean of its inputs under the client weights it reports
     (checked at run time: Delta_inner == w @ U; true for fedavg, krum, multikrum, ...), the soft weights
     combine multiplicatively: w'_k = w_k s_k * sum(w) / sum(w s), Delta = w' @ U  (``combination=reweighted``);
  3. otherwise (median, trimmed mean, geometric median, ...) per-client weights cannot enter a non-linear
     rule, so clients flagged by the decision rule are also removed before the inner rule and the
     remaining ones enter unweighted (``combination=excluded_flagged``). ``info["probe"]`` records the path.

Where the probe comes from (fedsafe's changes to the public code, each one of its weaknesses fixed):
  * no oracle: the probe is fitted on updates of the server's own shadow clients
    (:mod:`fedsafe.defenses.safe_fedllm_probe.shadow`), trained from the current global adapter on data the server holds
    (benign: normal + aligned; malicious: unaligned, generated or public), never on client data labels;
  * re-fitted every ``refit_every`` rounds on fresh shadows, since the feature distribution drifts with the
    global model (0 fits once, like the public code's freeze, and then a late attacker may be missed);
  * shadows run on the server; ``level=step`` instead lets clients report every local step's update
    features, which the server cannot verify: a malicious client can report benign-looking steps. A client
    is then scored on the logit of its steps' mean probability, and the held-out shadows that set the
    ``fpr`` / ``calibrated`` thresholds are scored the same way, one score per shadow client, never per
    step (a shadow's steps share one trajectory, so per-step rows are not exchangeable with the clients'
    scores: issue 28 measured a benign FPR of 0.278 under a logged bound of 0.049). A client that sends no
    step report falls back to its final update's logit, which the calibration does not cover;
  * robust rules compose with the probe (above); under secure aggregation it is refused
    (``needs_plaintext``): it reads individual updates.

The simulator's ground truth (``RoundContext.truth``) is used only to log each client's probability with
its true role and the ROC-AUC per round and cumulatively; no decision reads it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, RoundContext
from fedsafe.aggregators.probe_decision import DECISIONS, build_rule, holdout_share
from fedsafe.errors import ConfigError

log = logging.getLogger("fedsafe")


class UpdateFeatures:
    """Masked slice of a LoRA update -> optional seeded random projection -> optional L2 normalisation."""

    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.mask: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None

    @property
    def bound(self) -> bool:
        return self.mask is not None

    def bind(self, flat) -> UpdateFeatures:
        """Build the mask from a :class:`~fedsafe.fl.params.FlatLoRA` layout (and the projection matrix)."""
        layers_cfg = self.cfg.layers
        layer_ids = sorted({s.layer for s in flat.specs if s.layer is not None})
        if layers_cfg == "first":
            layers = layer_ids[:1] or None
        elif layers_cfg == "all":
            layers = None
        else:
            missing = [i for i in layers_cfg if i not in layer_ids]
            if missing:
                raise ConfigError(f"probe.features.layers={layers_cfg}: layers {missing} have no LoRA "
                                  f"weights; available: {layer_ids}")
            layers = list(layers_cfg)
        kind = None if self.cfg.kind == "both" else self.cfg.kind
        mask = flat.mask(kind, layers)
        if not bool(mask.any()):
            raise ConfigError(f"probe.features (kind={self.cfg.kind}, layers={layers_cfg}) selects no LoRA weight")
        self.mask = mask
        if self.cfg.project_dim is not None:
            gen = torch.Generator().manual_seed(self.seed)
            k = int(mask.sum())
            self.projection = torch.randn(k, self.cfg.project_dim, generator=gen) / math.sqrt(self.cfg.project_dim)
        return self

    @property
    def dim(self) -> int:
        return self.cfg.project_dim or int(self.mask.sum())

    def from_updates(self, updates: torch.Tensor) -> np.ndarray:
        """Features of full update vectors ``[m, d] -> [m, dim]``."""
        return self.from_masked(updates[:, self.mask])

    def from_masked(self, masked: torch.Tensor) -> np.ndarray:
        """Features of already-masked vectors ``[m, mask.sum()] -> [m, dim]`` (step-level reports)."""
        x = masked.float()
        if self.projection is not None:
            x = x @ self.projection
        if self.cfg.normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x.numpy().astype(np.float64)


def step_mean_logit(step_logits) -> float:
    """A client's score at ``level=step``: the logit of the mean of its steps' probabilities (clipped to
    [1e-15, 1 - 1e-15]); the decision rules' held-out shadows are scored with the same statistic."""
    p = float((1.0 / (1.0 + np.exp(-np.asarray(step_logits, dtype=np.float64)))).mean())
    p = min(max(p, 1e-15), 1 - 1e-15)
    return math.log(p / (1 - p))


def roc_auc(scores, labels) -> float | None:
    """ROC-AUC of ``scores`` against boolean ``labels``; None when only one class is present."""
    labels = [bool(v) for v in labels]
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, list(scores)))


class ProbeAggregator(Aggregator):
    """Safe-FedLLM probe as a rule (``probe``) or a filter in front of another rule (``probe+median``).

    Hyperparameters: the fields of :class:`fedsafe.defenses.safe_fedllm_probe.config.ProbeConfig` (``config``, or keyword overrides),
    and ``inner``, the rule that aggregates after the probe (FedAvg by default). See the module docstring
    for the formulas and the composition contract.
    """

    name = "probe"
    needs_plaintext = True
    is_filter = True
    needs_shadow = True

    def __init__(self, inner: Aggregator | None = None, config=None, **overrides):
        from pydantic import ValidationError

        from fedsafe.defenses.safe_fedllm_probe.config import ProbeConfig

        base = config.model_dump() if isinstance(config, ProbeConfig) else dict(config or {})
        try:
            self.config = ProbeConfig.model_validate({**base, **overrides})
        except ValidationError as err:
            raise ConfigError("probe: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                     for e in err.errors())) from None
        self.name = "probe" if inner is None else f"probe+{getattr(inner, 'name', type(inner).__name__)}"
        if inner is None:
            from fedsafe.aggregators.fedavg import FedAvg

            inner = FedAvg()
        self.inner = inner
        self.seed = self.config.seed if self.config.seed is not None else 0
        self.features = UpdateFeatures(self.config.features, seed=self.seed)
        self.classifier = None
        self.fitted_round: int | None = None
        self.history: list[tuple[np.ndarray, np.ndarray]] = []  # (X, y) of recent shadow batches
        self.trust: dict[str, list[float]] = {}  # client id -> [a, b]
        self.scored: list[tuple[float, bool]] = []  # (probability, truth) of every scored client so far
        self._context: RoundContext | None = None
        self._last_fit: dict = {}
        self._warned_nonlinear = False
        # the decision rule, and (logged only) what every other rule would have flagged on the same scores
        self.rule = build_rule(self.config)
        self.holdout = holdout_share(self.config)
        if self.rule.needs_holdout and self.holdout <= 0:
            raise ConfigError(f"probe.decision={self.config.decision} sets its threshold on held-out shadows: "
                              f"probe.holdout must be > 0, got {self.config.holdout}")
        self.other_rules = {}
        if self.config.log_decisions:
            for name in DECISIONS:
                if name != self.config.decision:
                    self.other_rules[name] = build_rule(self.config.model_copy(update={"decision": name}))
        self.calibration_history: list[tuple[np.ndarray, np.ndarray]] = []  # held-out (X, y) of recent refits

    # ---- fitting ---------------------------------------------------------------------------------
    def bind(self, flat) -> ProbeAggregator:
        """Fix the feature layout from the model's LoRA parameters (done on the first round otherwise)."""
        if not self.features.bound:
            self.features.bind(flat)
        return self

    def fit(self, features: np.ndarray, labels: np.ndarray) -> dict:
        """Fit the logistic-regression probe on feature rows ``[m, dim]`` with labels 1 = malicious."""
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels).astype(int)
        if len(set(labels.tolist())) < 2:
            raise ValueError("probe: the shadow set needs both benign and malicious updates")
        clf = LogisticRegression(C=self.config.C, max_iter=5000, random_state=self.seed)
        clf.fit(features, labels)
        self.classifier = clf
        train_p = clf.predict_proba(features)[:, 1]
        return {"samples": int(len(labels)), "malicious": int(labels.sum()),
                "train_auc": roc_auc(train_p, labels.astype(bool)),
                "train_accuracy": float(((train_p >= 0.5) == labels.astype(bool)).mean())}

    def fit_updates(self, updates: torch.Tensor, labels, flat=None) -> dict:
        """Fit on full update vectors ``[m, d]`` (binds the feature layout to ``flat`` if given)."""
        if flat is not None:
            self.bind(flat)
        return self.fit(self.features.from_updates(updates.float()), np.asarray(labels))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probability that each feature row comes from a malicious update."""
        if self.classifier is None:
            raise RuntimeError("probe: not fitted yet (it is fitted on shadow updates in prepare(), or by fit())")
        return self.classifier.predict_proba(features)[:, 1]

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The probe's logit ``w^T x + b`` of each feature row (``predict`` is its sigmoid)."""
        if self.classifier is None:
            raise RuntimeError("probe: not fitted yet (it is fitted on shadow updates in prepare(), or by fit())")
        return np.asarray(self.classifier.decision_function(features), dtype=np.float64)

    def calibrate(self, features: np.ndarray, labels, groups=None) -> dict:
        """Give the decision rules the fitted probe's scores on held-out shadow rows (labels 1 = malicious).

        ``groups``: the held-out shadow client of each row. At ``level=step`` a shadow client gives one row per
        local step while a real client is scored on one number, the logit of its steps' mean probability
        (:func:`step_mean_logit`); the rules are then calibrated on that same per-client statistic, one score
        per held-out shadow, so calibration scores and client scores are exchangeable (the split-conformal
        condition of ``decision=fpr``). Without ``groups`` every row is its own client."""
        labels = np.asarray(labels).astype(bool)
        logit = self.logits(features)
        rows = int(len(labels))
        if groups is not None and self.config.level == "step":
            groups = np.asarray(groups)
            ids, first = np.unique(groups, return_index=True)
            logit = np.array([step_mean_logit(logit[groups == g]) for g in ids])
            labels = labels[first]
        info = {"heldout": int(len(labels)), "heldout_rows": rows, "heldout_auc": roc_auc(logit, labels)}
        for name, rule in [(self.config.decision, self.rule), *self.other_rules.items()]:
            if not rule.needs_holdout:
                continue
            if name == self.config.decision or ((~labels).any() and labels.any()):
                fitted = rule.refit(logit[~labels], logit[labels])
                if name == self.config.decision:
                    info["rule"] = fitted
        return info

    def calibrate_updates(self, updates: torch.Tensor, labels) -> dict:
        """:meth:`calibrate` on full held-out update vectors ``[m, d]``, one per held-out client."""
        return self.calibrate(self.features.from_updates(updates.float()), np.asarray(labels),
                              groups=np.arange(len(updates)))

    def _refit_due(self, round_no: int) -> bool:
        if self.classifier is None:
            return True
        k = self.config.refit_every
        return k > 0 and (round_no - 1) % k == 0 and self.fitted_round != round_no

    def prepare(self, context: RoundContext):
        """Round start: run the shadow clients and refit when due; ask for step reports at ``level=step``."""
        self._context = context
        rc = context.round_config
        shadow = context.shadow
        if shadow is not None:
            self.bind(shadow.flat)
        if self.config.level == "step" and rc is not None:
            if not self.features.bound:
                raise ConfigError("probe.level=step needs the model layout: run it with shadow training")
            from dataclasses import replace

            rc = replace(rc, step_feature_mask=self.features.mask)
        if self._refit_due(context.round):
            if shadow is None:
                if self.classifier is None:
                    raise ConfigError("the probe needs the server's shadow clients to fit on (probe.benign and "
                                      "probe.malicious data); none were given to this round")
            else:
                rows_per_shadow: list[int] = []

                def featurize(result):
                    x = self._shadow_features(result)
                    rows_per_shadow.append(len(x))
                    return x

                X, y, shadow_info = shadow.collect(context.global_vec, rc, featurize)
                fit_rows, cal_rows = self._split_holdout(np.asarray(rows_per_shadow), y, context.round)
                shadow_of_row = np.repeat(np.arange(len(rows_per_shadow)), rows_per_shadow)
                self.history = (self.history + [(X[fit_rows], y[fit_rows])])[-self.config.history:]
                if len(cal_rows):
                    self.calibration_history = (self.calibration_history + [
                        (X[cal_rows], y[cal_rows], shadow_of_row[cal_rows])])[-self.config.history:]
                fit_info = self.fit(np.concatenate([h[0] for h in self.history]),
                                    np.concatenate([h[1] for h in self.history]))
                if self.calibration_history:  # rescored by the new probe at every refit
                    fit_info["calibration"] = self.calibrate(*self._calibration_rows())
                self.fitted_round = context.round
                self._last_fit = {"round": context.round, **fit_info, **shadow_info}
        return rc

    def _calibration_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The held-out rows of the kept refits, their labels and a shadow-client id unique across refits."""
        X, y, groups, offset = [], [], [], 0
        for entry in self.calibration_history:
            x_h, y_h = entry[0], entry[1]
            g_h = np.asarray(entry[2]) if len(entry) > 2 else np.arange(len(y_h))  # pre-group checkpoints
            X.append(x_h)
            y.append(y_h)
            groups.append(g_h + offset)
            offset += int(g_h.max()) + 1 if len(g_h) else 0
        return np.concatenate(X), np.concatenate(y), np.concatenate(groups)

    def _split_holdout(self, rows_per_shadow: np.ndarray, y: np.ndarray, round_no: int):
        """Row indices to fit on and to hold out: a seeded share ``holdout`` of each class's shadow clients."""
        starts = np.concatenate([[0], np.cumsum(rows_per_shadow)[:-1]]).astype(int)
        all_rows = np.arange(len(y))
        if self.holdout <= 0:
            return all_rows, all_rows[:0]
        rng = np.random.default_rng([self.seed, round_no, 19])
        held: list[int] = []
        for label in (0, 1):
            shadows = [i for i, s0 in enumerate(starts) if int(y[s0]) == label]
            k = int(round(self.holdout * len(shadows)))
            k = min(max(k, 1), len(shadows) - 1)
            if k < 1:
                raise ConfigError(f"probe.holdout={self.holdout} needs at least 2 shadows of each class "
                                  f"(probe.benign_shadows, probe.malicious_shadows): 1 to fit, 1 held out")
            held.extend(rng.choice(shadows, size=k, replace=False).tolist())
        mask = np.zeros(len(y), dtype=bool)
        for i in held:
            mask[starts[i]:starts[i] + rows_per_shadow[i]] = True
        return all_rows[~mask], all_rows[mask]

    def _shadow_features(self, result) -> np.ndarray:
        """Feature rows of one shadow client's result: every step at ``level=step``, else the final update."""
        steps = result.extra.get("step_updates")
        if self.config.level == "step" and steps is not None:
            return self.features.from_masked(steps)
        return self.features.from_updates(result.update[None, :])

    # ---- scoring and weighting ------------------------------------------------------------------
    def _probabilities(self, updates: torch.Tensor, client_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        logit, fell_back = self._logits(updates, client_ids)
        return 1.0 / (1.0 + np.exp(-logit)), fell_back

    def _logits(self, updates: torch.Tensor, client_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """Each client's logit (at ``level=step``: the logit of its steps' mean probability)."""
        if not self.features.bound:
            raise RuntimeError("probe: feature layout unknown; call bind(flat) or fit_updates(..., flat=...)")
        logit = self.logits(self.features.from_updates(updates))
        fell_back: list[str] = []
        if self.config.level == "step":
            extra = self._context.client_extra if self._context is not None else {}
            k = int(self.features.mask.sum())
            for i, cid in enumerate(client_ids):
                steps = extra.get(cid, {}).get("step_updates")
                ok = (isinstance(steps, torch.Tensor) and steps.ndim == 2 and steps.shape[0] > 0
                      and steps.shape[1] == k and bool(torch.isfinite(steps).all()))
                if ok:  # the client's own report: trusted, not verifiable
                    logit[i] = step_mean_logit(self.logits(self.features.from_masked(steps)))
                else:
                    fell_back.append(cid)
        return logit, fell_back

    def client_weights_from(self, probs: np.ndarray, client_ids: list[str],
                            flagged: np.ndarray | None = None) -> np.ndarray:
        """The weights s_k of the configured mode (updates the trust state in ``trust`` mode); ``flagged``:
        the decision rule's flags (default: the fixed threshold on ``probs``)."""
        c = self.config
        if flagged is None:
            flagged = probs >= c.threshold
        if c.mode == "exclude":
            return (~np.asarray(flagged, dtype=bool)).astype(np.float64)
        if c.mode == "probability":
            s = 1.0 - probs
        else:
            s = np.empty(len(probs))
            for i, (cid, p) in enumerate(zip(client_ids, probs)):
                a, b = self.trust.get(cid, [1.0, 1.0])
                a, b = c.decay * a + (1.0 - p), c.decay * b + p
                self.trust[cid] = [a, b]
                s[i] = a / (a + b)
        return np.where(s < c.min_weight, 0.0, s)

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n = updates.shape[0]
        logit, fell_back = self._logits(updates, client_ids)
        probs = 1.0 / (1.0 + np.exp(-logit))
        if not self.rule.ready:
            raise RuntimeError(f"probe.decision={self.config.decision}: the rule has no held-out shadow scores "
                               "yet (set at each refit in prepare(), or by calibrate())")
        decision = self.rule.decide(logit)
        flagged = np.asarray(decision.flagged, dtype=bool)
        s = self.client_weights_from(decision.probability, client_ids, flagged)
        truth = self._context.truth if self._context is not None and self._context.truth else {}
        thr = decision.threshold_logit
        info = {"round": self._context.round if self._context else None, "mode": self.config.mode,
                "level": self.config.level, "decision": self.config.decision,
                # the threshold on the probe's own scale: p (= sigmoid(logit)) from which a client is flagged
                "threshold": (None if thr is None else float(1.0 / (1.0 + math.exp(-thr)))
                              if self.config.decision != "fixed" else self.config.threshold),
                "threshold_logit": thr,
                "decision_info": _jsonable(decision.info, client_ids),
                "probability": {cid: float(p) for cid, p in zip(client_ids, probs)},
                "logit": {cid: float(v) for cid, v in zip(client_ids, logit)},
                "weight": {cid: float(w) for cid, w in zip(client_ids, s)},
                "flagged": [cid for cid, f in zip(client_ids, flagged) if f]}
        if self.config.decision == "calibrated":
            info["calibrated_probability"] = {cid: float(p) for cid, p in zip(client_ids, decision.probability)}
        if self.other_rules:  # the same scores under every other rule (logged only; no decision reads it)
            info["decisions"] = {name: [cid for cid, f in zip(client_ids, rule.decide(logit).flagged) if f]
                                 for name, rule in self.other_rules.items() if rule.ready}
        if truth:
            known = [cid for cid in client_ids if cid in truth]
            info["malicious"] = {cid: bool(truth[cid]) for cid in known}
            self.scored.extend((float(probs[client_ids.index(cid)]), bool(truth[cid])) for cid in known)
            info["auc"] = roc_auc([probs[client_ids.index(c)] for c in known], [truth[c] for c in known])
            info["auc_cumulative"] = roc_auc([p for p, _ in self.scored], [t for _, t in self.scored])
        if fell_back:
            info["step_report_missing"] = fell_back
        if self._last_fit and self._last_fit.get("round") == (self._context.round if self._context else None):
            info["refit"] = self._last_fit
        mean_s = float(s.mean()) if n else 0.0
        info["mean_weight"] = mean_s
        if mean_s < self.config.skip_below or not (s > 0).any():
            info["skipped"] = True
            return AggregationResult(torch.zeros(updates.shape[1], device=updates.device), torch.zeros(n), {"probe": info})
        info["skipped"] = False
        keep = np.flatnonzero(s > 0)
        res, keep, combination = self._compose(updates, num_samples, client_ids, keep, flagged, s)
        info["combination"] = combination
        weights = torch.zeros(n)
        weights[torch.as_tensor(keep)] = res.client_weights.float().cpu()
        inner_info = {"inner": res.info} if res.info else {}
        return AggregationResult(res.update, weights, {"probe": info, **inner_info})

    def _compose(self, updates, num_samples, client_ids, keep, flagged, s):
        """Run the inner rule on the kept clients and apply the soft weights (see the module docstring)."""
        idx = torch.as_tensor(keep)
        res = self.inner(updates[idx], num_samples[idx], [client_ids[i] for i in keep])
        soft = s[keep]
        if np.allclose(soft, soft[0]) and self.config.mode == "exclude":
            return res, keep, "excluded"
        w = res.client_weights.float().cpu()
        linear = w.shape == (len(keep),) and torch.allclose(
            res.update.float().cpu(), (w.to(updates.device) @ updates[idx].float()).cpu(), rtol=1e-4,
            atol=1e-6 * float(updates[idx].abs().max().clamp_min(1.0)))
        if linear:
            combined = w * torch.as_tensor(soft, dtype=torch.float32)
            if float(combined.sum()) <= 0:
                return AggregationResult(torch.zeros(updates.shape[1], device=updates.device), torch.zeros(len(keep)), res.info), \
                    keep, "reweighted"
            combined = combined * (w.sum() / combined.sum())
            return AggregationResult(combined.to(updates.device) @ updates[idx].float(), combined, res.info), keep, \
                "reweighted"
        if not self._warned_nonlinear:
            log.warning("probe+%s: the inner rule is not a weighted mean, so soft probe weights cannot enter "
                        "it; clients flagged by probe.decision=%s are excluded before it instead",
                        self.inner.name, self.config.decision)
            self._warned_nonlinear = True
        keep2 = np.array([i for i in keep if not flagged[i]], dtype=int)
        if len(keep2) == 0:
            return AggregationResult(torch.zeros(updates.shape[1], device=updates.device), torch.zeros(0), {}), keep2, \
                "excluded_flagged"
        if len(keep2) != len(keep):
            idx2 = torch.as_tensor(keep2)
            res = self.inner(updates[idx2], num_samples[idx2], [client_ids[i] for i in keep2])
        return res, keep2, "excluded_flagged"

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        inner_state = self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}
        return {"classifier": self.classifier, "fitted_round": self.fitted_round, "history": self.history,
                "trust": {k: list(v) for k, v in self.trust.items()}, "scored": list(self.scored),
                "inner": inner_state, "calibration_history": self.calibration_history,
                "rules": {name: rule.state_dict() for name, rule in
                          [(self.config.decision, self.rule), *self.other_rules.items()]}}

    def load_state_dict(self, state: dict) -> None:
        self.classifier = state.get("classifier")
        self.fitted_round = state.get("fitted_round")
        self.history = list(state.get("history", []))
        self.trust = {k: list(v) for k, v in state.get("trust", {}).items()}
        self.scored = [tuple(x) for x in state.get("scored", [])]
        self.calibration_history = list(state.get("calibration_history", []))
        for name, rule in [(self.config.decision, self.rule), *self.other_rules.items()]:
            if name in (state.get("rules") or {}):
                rule.load_state_dict(state["rules"][name])
        if state.get("inner") and hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state["inner"])

    def __repr__(self) -> str:
        c = self.config
        return (f"ProbeAggregator(inner={self.inner!r}, mode={c.mode!r}, decision={c.decision!r}, "
                f"threshold={c.threshold}, level={c.level!r})")


def _jsonable(info: dict, client_ids: list[str]) -> dict:
    """A decision's info for the round record: per-index maps keyed by client id, numbers as floats."""
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out[k] = {client_ids[i] if isinstance(i, int) and i < len(client_ids) else str(i): float(x)
                      for i, x in v.items()}
        elif isinstance(v, (np.floating, np.integer)):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def with_probe_config(name: str, params: dict, probe, seed: int) -> dict:
    """The rule ``name``'s ``params`` with the ``probe`` section routed to the probe, if the rule uses one."""
    params = dict(params)
    probe_cfg = probe if probe.seed is not None else probe.model_copy(update={"seed": seed})
    if name == "probe":
        return {**params, "config": probe_cfg}
    if name.startswith("probe+"):
        return {**params, "probe": {**dict(params.get("probe") or {}), "config": probe_cfg}}
    return params
