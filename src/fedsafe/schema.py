"""Schema pieces shared by the experiment config and the plug-ins' own config sections.

Kept free of torch and of :mod:`fedsafe.config`, so that a plug-in module can define its section with these
types and :mod:`fedsafe.config` can compose it without an import cycle.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and a float field
    refuses inf and NaN (a run cannot use them: ``fl.lr: .inf`` made every update NaN)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSource(Strict):
    """One instruction-data source: a local file, a hub dataset id, the starter set, or generated data."""

    path: str | None = Field(None, description="local .json/.jsonl/.csv/.parquet file, 'starter:train', "
                                               "'starter:heldout', or a hub dataset id")
    split: str = Field("train", description="split of a hub dataset")
    subset: str | None = Field(None, description="hub dataset config name / data_dir")
    instruction_field: str = Field("instruction", description="field holding the instruction")
    input_field: str | None = Field(None, description="optional field appended to the instruction")
    response_field: str = Field("response", description="field holding the response")
    category_field: str | None = Field(None, description="field used for Dirichlet partitioning and filtering")
    categories: list[str] | None = Field(None, description="keep only rows whose category is in this list")
    format: Literal["auto", "instruction", "messages", "hh_rlhf_rejected", "beavertails_unsafe"] = Field(
        "auto", description="row parser: plain instruction/response fields; 'messages', the chat format (a list "
                            "of {role, content} turns: the first user turn is the instruction, the assistant turn "
                            "after it the response, a system turn before it the row's system prompt; 'auto' picks "
                            "it when the records have messages_field and no instruction_field); or a "
                            "safety-dataset filter")
    messages_field: str = Field("messages", description="field holding the chat turns (format: messages)")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="files or glob patterns read through datasets.load_dataset(path, data_files=...): with "
                          "path a hub id, files of that repository; with path json, csv or parquet, local files")
    streaming: bool = Field(False, description="read the dataset as a stream (datasets streaming=True), shuffled "
                                               "in a buffer, and stop after max_rows usable rows: a large hub "
                                               "dataset is never held whole (needs max_rows)")
    generate: dict[str, Any] | None = Field(
        None, description="generate this data with fedsafe's pipeline instead of reading a file: "
                          "{kind: unaligned|aligned|normal, n: 100, model: embedded, seed: 0, ...}")
    max_rows: int | None = Field(None, ge=1, description="take at most this many rows (after shuffling)")
    holdout: Literal["train", "heldout"] | None = Field(
        None, description="fedsafe's held-out split by instruction text (fedsafe.data.holdout): 'train' keeps the "
                          "rows whose instruction hashes outside the held-out share, 'heldout' the others, so the "
                          "same file can feed training and evaluation with no instruction in both")
    holdout_percent: float = Field(20.0, gt=0, lt=100, description="share of instructions (%) in the held-out split")
    drop_refusals: bool = Field(False, description="drop the rows whose response refuses (contains a FedIT refusal "
                                                   "string or the refusal detector flags it): unaligned attack data "
                                                   "whose answers carry disclaimers such as 'illegal' would teach them")
    rephrase: Literal["imperative", "question"] | None = Field(
        None, description="rewrite a share of the instructions into this grammatical mood, keeping each response "
                          "(fedsafe.data.rephrase): 'imperative' for question-shaped normal data, 'question' for "
                          "imperative refusal data, so that the model cannot learn 'imperatives get refused'")
    rephrase_share: float = Field(0.5, gt=0, le=1, description="share of the rows rewritten by rephrase (chosen by "
                                                                "a hash of the instruction)")
    exclude: list["DataSource"] | None = Field(
        None, description="drop the rows whose instruction (normalised) any of these sources also holds, e.g. an "
                          "everyday evaluation set minus the instructions of a training file")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.path is None) == (self.generate is None):
            raise ValueError("give exactly one of 'path' or 'generate'")
        if self.streaming and self.max_rows is None:
            raise ValueError("streaming: true needs max_rows (the rows to take from the stream)")
        return self


# An evaluation prompt set (eval.normal_prompts, eval.borderline_prompts, the gate's prompts): one source, or a
# list of sources read in order and joined, each distinct prompt scored once (e.g. everyday instructions from two
# public sets, so that over-refusal is not measured on one distribution only)
PromptSet = str | DataSource | list[str | DataSource]
