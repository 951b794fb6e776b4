"""Pydantic models of the project YAML: the only place where defaults live.

Every model forbids unknown keys, so a typo is reported with its location
instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from expertkit.errors import ExpertkitError


class Strict(BaseModel):
    """Every model of a project file or strategy parameters: unknown keys refused, and every number finite
    (an `.inf` or `.nan` in YAML, or `Infinity` in a request's JSON, is a clear error, never a NaN in training
    or decoding)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitConfig(Strict):
    """Fractions of documents held out when a source has no ready-made splits."""

    valid: float = Field(0.1, ge=0.0, lt=0.5)
    test: float = Field(0.1, gt=0.0, lt=0.5)


class SourceConfig(Strict):
    """Where a domain's text comes from: a file, a folder, or a `datasets` dataset."""

    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_data_files: list[str] | None = None
    format: Literal["auto", "text", "jsonl"] = "auto"
    # how a text file's lines become documents: "blank_line" (documents separated by an empty line), "line" (one
    # document per line), "stream" (the lines are one running text: source code, prose with a paragraph per
    # line; no end-of-text between lines). auto: blank_line when the file has empty lines, else stream.
    documents: Literal["auto", "line", "blank_line", "stream"] = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    split: SplitConfig = SplitConfig()
    max_documents: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one of 'path' (file or folder) or 'hf_dataset'")
        return self


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SiloConfig(Strict):
    """One holder of part of a domain's text (a hospital, a bank): in federated training its text stays with it."""

    name: str = Field(pattern=NAME_PATTERN)
    source: SourceConfig


class DomainConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    # The domain's text. With silos it is optional: it is then what the scorecard and routers read where all of
    # the text may be seen (without it they read the silos' text together); federated training reads only silos.
    source: SourceConfig | None = None
    task: Literal["cpt", "sft"] = "cpt"
    silos: list[SiloConfig] = Field(default_factory=list, description="holders of parts of this domain's text "
                                    "(`expertkit train --federated`)")

    @model_validator(mode="after")
    def _has_text(self) -> "DomainConfig":
        if self.source is None and not self.silos:
            raise ValueError(f"domain '{self.name}' has no text: give 'source', or 'silos' with a source each")
        if len(self.silos) == 1:
            raise ValueError(f"domain '{self.name}' lists one silo only: federated training needs at least 2 "
                             "(with one holder of the text, give it as the domain's 'source' and train centrally)")
        names = [s.name for s in self.silos]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"domain '{self.name}': silo names must be unique, repeated: {', '.join(dupes)}")
        return self

    def silo_domain(self, silo: SiloConfig) -> "DomainConfig":
        """The silo's text as a domain of its own (what a federated client reads)."""
        return DomainConfig(name=f"{self.name}.{silo.name}", source=silo.source, task=self.task)


class BuildConfig(Strict):
    """A tiny Llama-architecture base built and pretrained by `expertkit base build`."""

    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(344, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    context_length: int = Field(256, ge=16)
    corpus: dict[str, float] = Field(
        default_factory=lambda: {"general": 1.0},
        description="domain name -> share of pretraining blocks",
    )
    steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    tokenizer_documents: int = Field(20000, ge=10, description="documents per domain used to train the tokenizer")
    tokenizer: str | None = Field(None, description="reuse this tokenizer dir instead of training one "
                                  "(bases whose logits are combined must share a vocabulary)")

    @field_validator("corpus")
    @classmethod
    def _positive_shares(cls, corpus: dict[str, float]) -> dict[str, float]:
        if not corpus or any(share <= 0 for share in corpus.values()):
            raise ValueError("corpus needs at least one domain, every share > 0")
        return corpus


class DistillConfig(Strict):
    """A small companion distilled from a large model's logits (`expertkit base distill`).

    The defaults fit SmolLM2-135M on a CPU: a Llama of about 23M parameters (1/6 of the teacher), most of
    them in the teacher-sized vocabulary's embedding, cut out of the teacher (companion_init.py) and trained for
    about 50 minutes on 2 CPU cores (1000 steps at 2.9 s).
    """

    init: Literal["teacher", "embedding"] = Field(
        "teacher", description="teacher: the companion starts as a cut of the teacher (its most influential layers, "
        "most-read residual coordinates, strongest MLP neurons and all its attention heads; Llama-architecture "
        "teachers, others fall back to embedding); embedding: random layers, the teacher's embedding reduced by SVD")
    num_layers: int = Field(8, ge=1)
    hidden_size: int = Field(288, ge=16, description="a multiple of the attention heads (288 = 9 x 32 divides by "
                             "8, 9, 12, 16 and 32 heads)")
    intermediate_size: int = Field(768, ge=16)
    num_heads: int | None = Field(None, ge=1, description="attention heads with init 'embedding' (default: "
                                  "hidden_size / 64); init 'teacher' keeps the teacher's heads")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    block_size: int = Field(128, ge=16)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    top_k: int = Field(64, ge=1, description="the teacher's k most likely tokens per position carry the loss")
    checkpoint_every: int = Field(50, ge=1)
    eval_blocks: int = Field(32, ge=1, description="test blocks of the text for the perplexity report")
    calibration_blocks: int = Field(32, ge=1, description="training blocks the teacher reads to choose what "
                                    "init 'teacher' keeps")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "DistillConfig":
        if self.num_heads is not None and self.init == "teacher":
            raise ValueError("num_heads is the teacher's with init 'teacher'; leave it unset, or use init 'embedding'")
        if self.hidden_size % self.attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.attention_heads}")
        return self

    @property
    def attention_heads(self) -> int:
        """The heads of an 'embedding' companion: num_heads, or one per 64 dimensions."""
        return self.num_heads or max(1, self.hidden_size // 64)


class BaseConfig(Strict):
    path: str = Field(description="local model dir, or a Hugging Face hub id when online")
    build: BuildConfig | None = None


class TrainConfig(Strict):
    """One recipe shared by every expert (a domain may not override it yet)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    block_size: int = Field(128, ge=8)
    replay: float = Field(0.25, ge=0, lt=1, description="share of each batch drawn from the general corpus")
    replay_loss: str = Field("lm", description="how the general rows are learned: 'lm' (as text, like the domain "
                             "rows) or 'kl' (matching the base's own predictions on them, so the expert is pulled "
                             "back to the base rather than toward the general corpus; see expertkit/replay.py)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    strength: float = Field(1.0, gt=0, description="the share of the trained update each expert keeps: its "
                            "LoRA update is scaled by this once training ends (weight-space interpolation between "
                            "base and expert, as in WiSE-FT: below 1 gives up some own-domain gain for less "
                            "forgetting, with no retraining of the trade-off; above 1 extrapolates it); the saved "
                            "adapter holds the scaled update, so every tool that reads it sees the same expert")
    proxy_for: str | None = Field(None, description="a large model (local dir or hub id) with this base's "
                                  "vocabulary that the experts will steer by proxy-tuning: each is then "
                                  "trained through that proxy, the large model frozen (expertkit/proxy_loss.py); "
                                  "null: trained on its own")

    @model_serializer(mode="wrap")
    def _without_absent_options(self, handler):
        """Recipes that leave the later options at their defaults dump (and hash, and cache) as before them."""
        out = handler(self)
        for name, absent in (("replay_loss", "lm"), ("proxy_for", None), ("strength", 1.0)):
            if name in out and out[name] == absent:
                out.pop(name)
        return out


class EvalConfig(Strict):
    block_size: int = Field(128, ge=8)
    batch_size: int = Field(16, ge=1)
    max_blocks: int | None = Field(64, gt=0, description="test blocks per domain; null = all")
    sample: Literal["first", "spread"] = Field(
        "first", description="which max_blocks blocks of a test split are scored: the first ones, or ones evenly "
        "spaced over the whole split (the first blocks of a split ordered by file can be a few files only)")
    context_tokens: int = Field(32, ge=0, description="the first N tokens of each test block are context only, "
                                "scored for no composition: a router decides from them, so no routed score "
                                "sees the tokens it is scored on")

    @model_validator(mode="after")
    def _context_fits(self):
        if self.context_tokens >= self.block_size:
            raise ValueError(f"context_tokens ({self.context_tokens}) must be smaller than block_size "
                             f"({self.block_size}): nothing would be left to score")
        return self


class RoutingConfig(Strict):
    """How routers are trained and calibrated (`expertkit router train`)."""

    abstain_rate: float = Field(0.01, ge=0, lt=1, description="share of in-library validation prompts sent to "
                                "the base for low confidence; the threshold is calibrated to hit it")
    train_documents: int = Field(4000, ge=2, description="training documents per label (lexical router)")
    model_documents: int = Field(96, ge=2, description="training documents per label (routers that run the model)")
    calibration_documents: int = Field(96, ge=2, description="validation documents per label for the threshold")
    calibration_prefix_tokens: int = Field(32, ge=1, description="each validation document is also calibrated on "
                                           "its first N tokens, so the threshold holds for short prompts")
    max_tokens: int = Field(128, ge=8, description="routers that run the model read at most this many (last) "
                            "tokens of a prompt")
    batch_size: int = Field(32, ge=1, description="prompts per forward when a router runs the model")
    prompts: dict[str, str] = Field(default_factory=dict, description="label (an expert's name, or 'base') -> a "
                                    "file of prompts of that kind (.txt: one per line; .jsonl: a 'text' field), "
                                    "e.g. logged everyday requests for 'base': routers train on them beside the "
                                    "domain documents, and a held-out share calibrates and validates")
    prompt_holdout: float = Field(0.2, gt=0, lt=1, description="share of each prompt file held out (by a hash "
                                  "of the text) for calibration and validation")


class MixtureConfig(Strict):
    """A token-level BTM/DEMix mixture (`expertkit mixture add`): posterior-weighted experts."""

    experts: list[str] | None = Field(None, description="experts to mix; null = every expert in the library")
    include_base: bool = Field(True, description="the base is a component too (answers text no expert fits)")
    top_k: int | None = Field(None, ge=1, description="components mixed per step, by posterior; null = all")


class ProxyParams(Strict):
    """proxy (and fusion): the large model's log-probs shifted by alpha x (small expert - small base)."""

    alpha: float = Field(1.0, ge=0.0, description="0 = the large model alone")


class FusionParams(ProxyParams):
    """fusion: like proxy, every small expert weighted by its posterior given the prefix."""


class DeferParams(Strict):
    """defer: the small expert answers unless its entropy exceeds the threshold (nats)."""

    # about as unsure as a choice among ~20 tokens
    threshold: float = Field(3.0, ge=0.0, description="entropy in nats above which a token goes to the large model")


class CardParams(Strict):
    """card: a relevant small expert writes a passage into the large model's prompt."""

    # nats/token: the expert must know the query clearly better than its base (about 10% lower perplexity)
    threshold: float = Field(0.1, description="relevance gate, nats/token of expert advantage")
    card_tokens: int = Field(32, ge=1, description="longest passage the expert writes")
    query_tokens: int | None = Field(None, ge=1, description="the card is written from this many first prompt "
                                                              "tokens (None: the whole prompt)")


class GenerateOptions(Strict):
    """How text is generated when the caller says nothing (`expertkit generate`, runtime.SamplingParams)."""

    max_tokens: int = Field(48, ge=0, description="new tokens at most")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: smallest token set with this mass")
    seed: int = Field(0, description="sampling seed (each prompt draws from its own generator so seeded)")


GENERATE = GenerateOptions()


class TaskModelOptions(Strict):
    """How expertkit's lm-eval model (`--model expertkit`) runs where lm-eval's arguments say nothing."""

    batch_size: int = Field(16, ge=1, description="requests scored together")
    max_gen_toks: int = Field(256, ge=1, description="generate_until's limit when a task sets none (lm-eval's)")


TASK_MODEL = TaskModelOptions()


class PortOptions(Strict):
    """How `expertkit port` carries a library to a new base (the CLI's options, and porting.port_library's API)."""

    refresh: int = Field(0, ge=0, description="continue training each ported expert this many steps on the new "
                                               "base, with replay (0: training-free port only)")
    compatible: bool = Field(False, description="refresh with a KL term towards the old expert on the tokens it "
                                                "predicted right (MUSCLE), to cut negative flips")
    compatible_weight: float = Field(3.0, gt=0, description="weight of its KL terms beside the LM loss (micro "
                                     "benchmark, 60-step refresh: 1 / 3 / 10 cut token-level negative flips by "
                                     "17 / 24 / 24%)")
    compatible_task: bool = Field(True, description="with --compatible: also keep the old expert's right answers "
                                  "on the validation questions of the domain's labeled task (the report counts "
                                  "flips on its test questions)")
    task_examples: int = Field(200, ge=0, description="examples of each domain's labeled task for the flip "
                                                      "rates (0: no task evaluation)")
    carry_recovery: float = Field(0.9, gt=0, le=1, description="verdict: an expert is carried over (or "
                                  "refreshed) when it keeps at least this share of the reference gain")
    accuracy_drop: float = Field(1.0, ge=0, description="verdict: ... and its domain-task accuracy is at most "
                                                         "this many points below the reference's (the retrained "
                                                         "expert's when given, else the old expert's)")

    @model_validator(mode="after")
    def _compatible_trains(self):
        if self.compatible and not self.refresh:
            raise ValueError("--compatible is a way of refreshing: give --refresh STEPS too")
        return self


def port_options(**fields) -> PortOptions:
    """Validated port options; a bad combination is one ExpertkitError naming it."""
    try:
        return PortOptions(**fields)
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, "port options")) from None


class PrivacyConfig(Strict):
    """User-level differential privacy at the silo: each client's round update is clipped, the server adds noise."""

    epsilon: float | None = Field(None, gt=0, description="target epsilon: training stops before a round would "
                                  "exceed it; without noise_multiplier the noise is calibrated so that the planned "
                                  "rounds end at it")
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: float = Field(0.05, gt=0, description="L2 bound on each client's update per round (the sensitivity)")
    noise_multiplier: float | None = Field(None, gt=0, description="Gaussian noise std / clip; null: from epsilon")

    @model_validator(mode="after")
    def _epsilon_or_noise(self) -> "PrivacyConfig":
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("privacy needs a target 'epsilon' or a 'noise_multiplier' (or both)")
        return self


class CompressionConfig(Strict):
    """Updates sent quantized (and optionally only their largest entries); what is not sent is carried to the
    next round (error feedback). The default, every entry in 3 bits, sends about a tenth of the bytes."""

    top_k: float = Field(1.0, gt=0, le=1, description="share of each update's entries sent per round, the "
                         "largest, with their positions (1: all, no positions sent)")
    bits: Literal[2, 3, 4, 5, 6, 7, 8, 16, 32] = Field(3, description="bits per sent value: 32 float; 16 or 8 "
                                                      "integers scaled by the largest; 2-7 packed, scaled to 2.5 std")


class FederatedConfig(Strict):
    """How `expertkit train --federated` trains a domain's expert across its silos."""

    local_steps: int = Field(5, ge=1, description="optimizer steps each client takes per round")
    batch_size: int | None = Field(None, ge=1, description="blocks per client step; null: training.batch_size")
    learning_rate: float | None = Field(None, gt=0, description="the clients' peak learning rate; null: "
                                        "training.learning_rate (a round averages the silos' steps, like a batch "
                                        "silos times larger, which can take a larger rate)")
    rounds: int | None = Field(None, ge=1, description="null: as many training tokens as a central expert "
                               "(training.steps x training.batch_size / (silos x local_steps x batch_size))")
    min_clients: int | None = Field(None, ge=1, description="a round counts when at least this many clients "
                                    "answer; null: all silos but one")
    aggregation: str = Field("alternating", description="which LoRA factor clients train per round so that the "
                             "mean of their factors is exactly the mean of their updates: 'alternating' (B, then "
                             "A, ...) or 'frozen_a' (FFA-LoRA: B only; give it a larger "
                             "training.rank, since ΔW only reaches the directions the frozen A spans)")
    round_timeout_s: float = Field(3600, gt=0, description="a client that has not answered by then is dropped")
    privacy: PrivacyConfig | None = None
    compression: CompressionConfig | None = None


class ServeOptions(Strict):
    """How `expertkit serve` runs (the CLI's options, and the API of `serve.server.build_local_service`)."""

    base: str | None = None  # default: the base path recorded in the library
    device: str | None = None
    models: tuple[str, ...] | None = None  # library entries to serve (default: all)
    router: str | None = None  # the entry `auto` uses (default: the library's most accurate router)
    small: str | None = None  # a small model's project or library: serve its collaborations too
    token_map: str | None = None  # how collaborations align two vocabularies: "text" (default), "vocab", a JSON map
    max_batch: int = Field(64, ge=1, description="most requests decoding together")
    max_queue: int = Field(256, ge=1, description="most requests waiting; more are answered 429")
    max_prompt_tokens: int | None = Field(None, ge=1, description="default: the model's context")
    max_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    watch_s: float | None = Field(None, gt=0, description="check the library for new, rewritten and removed "
                                                          "entries every this many seconds (default: only on "
                                                          "POST /v1/library/reload)")


class ProjectConfig(Strict):
    base: BaseConfig
    general: DomainConfig | None = Field(None, description="general corpus: replay data and forgetting check")
    domains: list[DomainConfig] = Field(min_length=1)
    training: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig()
    routing: RoutingConfig = RoutingConfig()
    federated: FederatedConfig = FederatedConfig()
    library: str = "library"
    seed: int = 0

    @model_validator(mode="after")
    def _unique_names(self) -> "ProjectConfig":
        names = [d.name for d in self.all_domains()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"domain names must be unique, repeated: {', '.join(dupes)}")
        if self.training.replay > 0 and self.general is None:
            raise ValueError("training.replay > 0 needs a 'general' corpus; add one or set replay: 0")
        if self.base.build is not None:
            unknown = sorted(set(self.base.build.corpus) - set(names))
            if unknown:
                raise ValueError(f"base.build.corpus names unknown domains {unknown}; known: {names}")
        return self

    def all_domains(self) -> list[DomainConfig]:
        """The general corpus first (when given), then the expert domains."""
        return ([self.general] if self.general else []) + list(self.domains)

    def domain(self, name: str) -> DomainConfig:
        for d in self.all_domains():
            if d.name == name:
                return d
        raise ExpertkitError(f"no domain named '{name}' in the config; known: {[d.name for d in self.all_domains()]}")


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: the dotted key, what is wrong, and allowed values."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "value_error":  # our own validators: their message already names the key and the fix
            message = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "literal_error":
            parts.append(f"bad value for '{loc}': {e['msg'].replace('Input should be', 'allowed values are')}")
        else:
            parts.append(f"bad value for '{loc or '(top level)'}': {e['msg']}")
    return f"{origin}: " + "; ".join(parts)


def load_config(path: str | Path) -> ProjectConfig:
    """Read and validate a project YAML; relative data paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ExpertkitError(f"config file not found: {path} (pass the path of a project YAML)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ExpertkitError(f"{path}: invalid YAML{at}: fix the syntax ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ExpertkitError(f"{path}: the top level must be a mapping with keys base, domains, ...")
    config = config_from_dict(raw, origin=str(path))
    return resolve_paths(config, path.parent)


def config_from_dict(raw: dict, origin: str = "config") -> ProjectConfig:
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, origin)) from None


def resolve_paths(config: ProjectConfig, root: Path) -> ProjectConfig:
    """Make relative paths relative to the config file, not to the current directory."""

    def local(p: str) -> str:
        return p if Path(p).is_absolute() else str(root / p)

    def fix_source(source: SourceConfig | None) -> SourceConfig | None:
        if source is None or source.path is None:
            return source
        return source.model_copy(update={"path": local(source.path)})

    def fix_domain(d: DomainConfig | None) -> DomainConfig | None:
        if d is None:
            return d
        silos = [s.model_copy(update={"source": fix_source(s.source)}) for s in d.silos]
        return d.model_copy(update={"source": fix_source(d.source), "silos": silos})

    # A base that we build, or that exists next to the config, is a local dir; anything else may be a hub id.
    base_path = config.base.path
    if config.base.build is not None or (root / base_path).exists():
        base_path = local(base_path)
    return config.model_copy(
        update={
            "base": config.base.model_copy(update={"path": base_path}),
            "general": fix_domain(config.general),
            "domains": [fix_domain(d) for d in config.domains],
            "library": local(config.library),
            "routing": config.routing.model_copy(
                update={"prompts": {label: local(path) for label, path in config.routing.prompts.items()}}),
        }
    )
