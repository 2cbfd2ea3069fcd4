"""The check that evaluation prompts were never trained on.

Over-refusal measured on rows drawn from the data the models trained on says little about everyday use (a
model that learned "refuse anything unusual" still answers its own training instructions). fedsafe's split
(:mod:`fedsafe.data.split`, a pure function of the instruction) makes a data source with ``holdout: train`` and
an evaluation set with ``holdout: heldout`` over the same file disjoint by construction, which
:func:`check_disjoint` verifies at run start against *every* instruction any client, the post-hoc step, the
probe or the validation guard trains on.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsafe.data.split import in_split, normalise_instruction  # noqa: F401 (re-exported for callers)


def overlap(train_instructions: Iterable[str], prompts: Iterable[str]) -> list[str]:
    """The prompts whose normalised text is also a training instruction (in prompt order)."""
    seen = {normalise_instruction(t) for t in train_instructions}
    return [p for p in prompts if normalise_instruction(p) in seen]


# ------------------------------------------------------------------------------------------------
# The run-start check
# ------------------------------------------------------------------------------------------------

# sections of the experiment config whose data sources are evaluation data, not training data
EVAL_ONLY = ("eval", "data.heldout", "gate")


def _data_sources(node, where: str = ""):
    """Yield ``(config path, source dict)`` for every data-source-shaped dict in a dumped config."""
    if isinstance(node, dict):
        if ("path" in node and isinstance(node.get("path"), str)) or isinstance(node.get("generate"), dict):
            yield where, node
            return
        for k, v in node.items():
            yield from _data_sources(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _data_sources(v, f"{where}[{i}]")


def training_sources(config: dict, skip: list[str] | tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``(config path, source dict)`` of every data source a run may train on, in a dumped config: all but those
    under the evaluation sections (:data:`EVAL_ONLY`) and the sections in ``skip``."""
    return [(where, src) for where, src in _data_sources(config)
            if not any(where == e or where.startswith((e + ".", e + "[")) for e in (*EVAL_ONLY, *skip))]


def training_instructions(config: dict, skip: list[str] | tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every instruction a run may train on, by the config path of its source.

    ``config`` is the dumped experiment config (``dump_config`` / ``model_dump``). Every data source outside
    ``eval`` and ``data.heldout`` counts as training data: client roles, the post-hoc step's aligned and normal
    pools (whose validation rows are a subset), a probe's shadow data, an aligned base model's data. A generated
    source counts with the instruction file it generates from (``generate.instructions``), a superset.
    ``skip`` names sections that do not train in this run (plug-ins that are not active).
    """
    from fedsafe.data.sources import load_rows
    from fedsafe.schema import DataSource

    out: dict[str, list[str]] = {}
    for where, src in training_sources(config, skip):
        if isinstance(src.get("generate"), dict):
            ins = src["generate"].get("instructions")
            if not isinstance(ins, str) or ins in ("harmful", "curious", "normal"):
                continue  # built-in instruction kinds of the generator: fedsafe's own templates
            cats = src["generate"].get("instruction_categories")
            src = {"path": ins, **({"categories": list(cats)} if cats else {})}
        # drop_refusals only removes rows: the instructions without it are a superset, and reading them skips
        # running the refusal detector over every answer of the source for a check that needs none of them;
        # rephrase rewrites instructions the model still learns the content of: the check compares the originals
        fields = {k: v for k, v in src.items()
                  if k in DataSource.model_fields and k not in ("drop_refusals", "rephrase", "rephrase_share")}
        try:
            source = DataSource(**fields)
            rows = load_rows(source.model_copy(update={"max_rows": None}))
        except Exception:  # noqa: BLE001 - a source this check cannot read fails where the run reads it
            continue
        out[where] = [r["instruction"] for r in rows]
    return out


def check_disjoint(config: dict, eval_sets: dict[str, list[str]], skip: list[str] | tuple[str, ...] = ()
                   ) -> dict[str, int]:
    """Raise :class:`~fedsafe.errors.ConfigError` when an evaluation prompt is also a training instruction.

    ``eval_sets`` maps a config field (``eval.normal_prompts``) to its prompts. Returns the number of prompts
    checked per field (logged in the run record as the held-out check).
    """
    from fedsafe.errors import ConfigError

    train = training_instructions(config, skip)
    checked = {}
    for field, prompts in eval_sets.items():
        for where, instructions in train.items():
            common = overlap(instructions, prompts)
            if common:
                raise ConfigError(
                    f"{field}: {len(common)} of {len(prompts)} prompts are also training instructions of {where} "
                    f"(e.g. {common[0][:80]!r}); over-refusal must be measured on prompts no model trained on: "
                    f"give {field} and {where} the same file with holdout: heldout / holdout: train, or another file")
        checked[field] = len(prompts)
    return checked
