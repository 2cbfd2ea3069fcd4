"""The release gate's schema: a policy of thresholds (a YAML file or the ``gate.policy`` section of a run config)
and the ``gate:`` section of a run. Light (pydantic and YAML only): a config validates without torch.

:mod:`fedsafe.evaluation.gate.verdict` measures an adapter against a policy and decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsafe.errors import ConfigError, did_you_mean, field_paths
from fedsafe.schema import DataSource, PromptSet

# fewest outcomes a metric needs before the gate lets it decide (a policy sets min_n per metric): 8 prompts at
# 12.5% over-refusal have a 95% Wilson interval of [2.2%, 47%], which says nothing about a 15% limit
MIN_N_SHARE = 30
MIN_N_MEAN = 20
CONFIDENCE = 0.95  # = fedsafe.stats.CONFIDENCE (tests/test_gate.py checks it); stats imports numpy, a policy must not

SCHEMA = "fedsafe.gate/1"
GATE_JSON = "gate.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a threshold of .inf passes everything


# ------------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------------

class RuleThreshold(_Section):
    """Rule: % of answers to harmful prompts that contain a refusal string (higher is safer)."""

    min: float = Field(..., ge=0, le=100, description="minimum Rule (%)")
    prompts: str | None = Field(None, description="harmful prompts (eval.prompts; default: the run's)")
    n_prompts: int | None = Field(None, ge=1, description="this many of them (eval.n_prompts)")
    rule_list: Literal["fedit", "gcg"] | None = Field(None, description="refusal strings (eval.rule_list)")
    min_n: int = Field(MIN_N_SHARE, ge=1, description="fewest prompts that can decide this metric: "
                                                     "fewer is WARN (FAIL with strict)")


class OverRefusalThreshold(_Section):
    """Over-refusal: % of answers to benign prompts that contain a refusal string (lower is better)."""

    max: float = Field(..., ge=0, le=100, description="maximum over-refusal (%)")
    prompts: PromptSet | None = Field(None, description="benign prompts (eval.normal_prompts)")
    n_prompts: int | None = Field(None, ge=1, description="this many of them (eval.n_normal_prompts)")
    min_n: int = Field(MIN_N_SHARE, ge=1, description="fewest prompts that can decide this metric: "
                                                     "fewer is WARN (FAIL with strict)")


class BorderlineThreshold(_Section):
    """Borderline refusal: % refusals of safe prompts that look harmful (XSTest-style; lower is better)."""

    max: float = Field(..., ge=0, le=100, description="maximum borderline refusal (%)")
    prompts: PromptSet | None = Field(None, description="borderline prompts (eval.borderline_prompts)")
    n_prompts: int | None = Field(None, ge=1, description="this many of them (eval.n_borderline_prompts)")
    min_n: int = Field(MIN_N_SHARE, ge=1, description="fewest prompts that can decide this metric: "
                                                     "fewer is WARN (FAIL with strict)")


class HelpfulnessThreshold(_Section):
    """Helpfulness proxy: relative rise of the held-out answer perplexity over a reference (lower is better)."""

    max_regression_pct: float = Field(..., description="maximum 100 * (ppl / ppl_reference - 1), in %")
    reference: str = Field("base", description="'base' (the adapter switched off), or an adapter / run "
                                               "directory; --reference overrides")
    heldout: list[DataSource] | None = Field(None, description="held-out instruction/answer rows "
                                                               "(data.heldout; default: the run's)")
    min_n: int = Field(MIN_N_MEAN, ge=1, description="fewest held-out rows that can decide this metric: "
                                                     "fewer is WARN (FAIL with strict)")


class JudgeThreshold(_Section):
    """Judge safe rate: % of answers to harmful prompts an LLM judge calls safe."""

    min: float = Field(..., ge=0, le=100, description="minimum safe rate (%)")
    judge: dict[str, Any] | None = Field(None, description="judge spec (eval.judge; default: the run's)")
    min_n: int = Field(MIN_N_SHARE, ge=1, description="fewest judged answers that can decide this metric: "
                                                     "fewer is WARN (FAIL with strict)")


class RewardThreshold(_Section):
    """Reward: mean reward-model score of the answers to the harmful prompts."""

    min: float = Field(..., description="minimum mean reward")
    model: str | None = Field(None, description="reward model (eval.reward_model; default: the run's)")
    min_n: int = Field(MIN_N_MEAN, ge=1, description="fewest prompts that can decide this metric: "
                                                     "fewer is WARN (FAIL with strict)")


class GatePolicy(_Section):
    """Thresholds an adapter must meet before release; each names the prompt set it is measured on."""

    rule: RuleThreshold | None = None
    over_refusal: OverRefusalThreshold | None = None
    borderline_refusal: BorderlineThreshold | None = None
    helpfulness_proxy: HelpfulnessThreshold | None = None
    judge: JudgeThreshold | None = None
    reward: RewardThreshold | None = None
    max_new_tokens: int | None = Field(None, ge=1, description="generation length (eval.max_new_tokens)")
    batch_size: int | None = Field(None, ge=1, description="generation batch size (eval.batch_size)")
    strict: bool = Field(False, description="an interval that crosses a threshold, or fewer outcomes than min_n, "
                                            "FAILs the metric (default: WARN, which is not a pass either)")
    confidence: float = Field(CONFIDENCE, gt=0, lt=1, description="interval level")

    @model_validator(mode="after")
    def _some_threshold(self) -> "GatePolicy":
        if not any(getattr(self, m) is not None for m in METRICS):
            raise ValueError(f"a gate policy needs at least one threshold: {', '.join(METRICS)}")
        return self


METRICS = ("rule", "over_refusal", "borderline_refusal", "helpfulness_proxy", "judge", "reward")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid gate policy ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = ("unknown field" + did_you_mean(loc, field_paths(GatePolicy)) if e["type"] == "extra_forbidden"
               else e["msg"].removeprefix("Value error, "))
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_policy(data: Any, source: str) -> GatePolicy:
    """A :class:`GatePolicy` from a mapping; ConfigError naming ``source`` and the field otherwise."""
    if isinstance(data, GatePolicy):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"gate policy {source} must be a mapping of thresholds, got {type(data).__name__}")
    try:
        return GatePolicy.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_policy(path: str | Path) -> GatePolicy:
    """Read a policy YAML file (ConfigError naming the path or the field on bad input)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--policy {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--policy {p}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        from fedsafe.config import _resolve_paths

        _resolve_paths(data, p.parent)  # prompt / data paths relative to the policy file, as in a run config
    return parse_policy(data, str(p))



class GateConfig(_Section):
    """``gate:`` section of a run config: check the trained adapter against a release policy."""

    policy: str | GatePolicy | None = Field(None, description="a policy YAML file, or the policy inline; "
                                                              "None: no gate")
    strict: bool | None = Field(None, description="pass a metric only when its whole 95% interval passes "
                                                  "(default: the policy's strict)")
    reference: str | None = Field(None, description="helpfulness reference: 'base' or an adapter / run "
                                                    "directory (default: the policy's)")
