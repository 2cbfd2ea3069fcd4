"""The ``posthoc`` section of the post-hoc defense (light: a config validates without torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedsafe.schema import DataSource, Strict


class PosthocConfig(Strict):
    """Server-side post-hoc safety fine-tuning on defense data (Ye et al., levels 1-3)."""

    enabled: bool = False
    level: Literal[1, 2, 3] = Field(1, description="1: sample datasets; 2: external model generates; "
                                                   "3: the aggregated model generates")
    aligned: list[DataSource] | None = Field(None, description="level 1: aligned (harmful request + refusal) data")
    normal: list[DataSource] | None = Field(None, description="level 1: normal data")
    generator_model: str = Field("embedded", description="level 2: model that generates the defense data")
    n_samples: int = Field(200, ge=1, description="defense samples (the paper uses 1,000)")
    aligned_ratio: float = Field(0.5, ge=0, le=1, description="share of aligned samples in the defense data")
    steps: int = Field(30, ge=1, description="defense fine-tuning steps (the paper uses 500)")
    lr: float | None = Field(None, gt=0, description="defense learning rate (default: fl.lr)")
    batch_size: int | None = Field(None, ge=1, description="default: fl.batch_size")
    seed_instructions: int = Field(64, ge=1, description="levels 2/3: instructions to generate per kind")
    max_new_tokens: int = Field(96, ge=8, description="levels 2/3: response length")
    generation: dict[str, Any] = Field(default_factory=dict, description="levels 2/3: more datagen options "
                                       "(temperature, top_p, batch_size, per_prompt, instructions: <file>, ...)")
    validation_rows: int = Field(0, ge=0, description="utility guard: normal rows held out of the defense data "
                                 "(never trained on); 0 = no guard, the adapter after `steps` is used")
    validation: list[DataSource] | None = Field(
        None, description="utility guard: where its `validation_rows` rows (instruction + reference answer) come "
                          "from; None = held out of `normal`. A source of another kind than the defense's normal "
                          "rows (coding requests beside everyday questions, say) shows a refusal habit that rows "
                          "of the trained distribution hide; its instructions are never trained on")
    max_ppl_rise: float = Field(0.0, ge=0, description="utility guard: keep the latest checkpoint whose perplexity "
                                "on the validation rows is at most this many percent above the starting adapter's")
    check_every: int = Field(10, ge=1, description="utility guard: steps between checkpoints (the last step is "
                             "always one)")
    max_refusal_rise: float | None = Field(
        None, ge=0, description="utility guard: also require that the share of validation instructions the model "
                                "refuses (fedsafe.evaluation.detect_refusals on greedy answers) is at most this many "
                                "points above the starting adapter's; None = perplexity only")
    refusal_tokens: int = Field(24, ge=4, description="utility guard: answer length generated for the refusal check")

    @model_validator(mode="after")
    def _guard_fits(self):
        if self.max_refusal_rise is not None and not self.validation_rows:
            raise ValueError("posthoc.max_refusal_rise needs posthoc.validation_rows > 0: the refusal check asks "
                             "the held-out validation instructions")
        if self.validation and not self.validation_rows:
            raise ValueError("posthoc.validation needs posthoc.validation_rows > 0: how many of its rows the guard "
                             "checks")
        if self.validation_rows and self.aligned_ratio >= 1 and not self.validation:
            raise ValueError("posthoc.validation_rows needs normal defense data (aligned_ratio < 1): the guard "
                             "measures perplexity on held-out normal rows")
        return self
