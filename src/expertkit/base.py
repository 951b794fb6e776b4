"""Load a base model + tokenizer, fingerprint them, and build/pretrain a tiny Llama base.

The identity hashes are what the library uses to refuse an expert on the wrong
base: the config hash catches a different architecture, the weights hash
catches the same architecture with other weights (it samples every tensor, so
it is fast even for large models).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from expertkit.errors import ExpertkitError

IDENTITY_KEYS = ("config_hash", "weights_hash", "tokenizer_hash")  # what makes two bases the same base


def identity_mismatch(found: dict, expected: dict) -> list[str]:
    """The IDENTITY_KEYS on which two base identities differ (empty: the same base)."""
    return [k for k in IDENTITY_KEYS if found.get(k) != expected.get(k)]
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                        "_attn_implementation_autoset", "_commit_hash"}


@dataclass(eq=False)  # compared (and hashed) by identity: runtime.pool keeps each loaded base's adapters by it
class Base:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    _identity: dict | None = None

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes, as its config says (None when it does not say)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def has_adapters(self) -> bool:
        """Whether LoRA layers are attached to the model (runtime.ExpertPool attaches a library's adapters)."""
        return any("lora_" in name for name, _ in self.model.named_parameters())

    def require_clean(self, what: str) -> None:
        """Training wraps the model in a new PEFT model: on a model a pool already wrapped, the two collide."""
        if self.has_adapters:
            raise ExpertkitError(f"this base already has library adapters attached; {what} on a freshly loaded base")

    def identity(self) -> dict:
        """Computed once, before adapters are attached (they live inside the same modules)."""
        if self._identity is None:
            self._identity = {"name": self.name, **model_hashes(self.model),
                              "tokenizer_hash": tokenizer_hash(self.tokenizer)}
        return self._identity


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_hashes(model: torch.nn.Module) -> dict:
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return {"config_hash": config_hash, "weights_hash": h.hexdigest()[:16]}


def tokenizer_hash(tokenizer) -> str:
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def load_base(path: str, device: str | None = None) -> Base:
    """Any HF causal LM from a local dir (or a hub id when online); safetensors weights only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):  # a path, not a hub id
        raise ExpertkitError(f"base model not found: {path} (build one with `expertkit base build` or fix base.path)")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ExpertkitError(f"{path} is not a Hugging Face model dir (no config.json); fix base.path")
    dev = pick_device(device)
    # float32 on CPU (half-precision matmuls are slow there); the checkpoint's own dtype on an accelerator
    dtype = torch.float32 if dev.type == "cpu" else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as e:  # missing files, no network, unknown architecture
        raise ExpertkitError(
            f"cannot load base model '{path}': {str(e).splitlines()[0]} "
            "(use a local model dir with safetensors weights, or a hub id while online)"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    base = Base(model=model, tokenizer=tokenizer, name=str(path), device=dev)
    base.identity()
    return base


DISTILL_FILE = "distill.json"  # in a companion's dir (expertkit.distill): its teacher and how it was made


def companion_teacher(model_dir: str | Path) -> dict | None:
    """The identity of the model a companion was distilled from (None: not a distilled companion)."""
    path = Path(model_dir) / DISTILL_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["teacher"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExpertkitError(f"{path} is damaged ({e}); distill the companion again") from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


_WORKER_BASES: dict[tuple, Base] = {}  # in a worker process: the base its jobs share (one at a time)


@dataclass
class BaseSpec:
    """How a job gets the base: in this process the loaded Base itself, elsewhere its path + identity.

    The `local` reference is dropped when the spec is pickled for another process, which loads the
    base from `path` once (then reuses it) and checks that it is the driver's base, hash for hash.
    """

    path: str
    identity: dict
    device: str | None = None  # None: the worker picks (the GPU its executor gave it, else the CPU)
    local: Base | None = None

    @classmethod
    def of(cls, base: Base) -> "BaseSpec":
        path = Path(base.name)
        return cls(str(path.resolve()) if path.exists() else base.name, base.identity(), local=base)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "local": None}

    def load(self, clean: bool = False) -> Base:
        """The base; `clean`: without library adapters attached (training needs the bare model)."""
        if self.local is not None:
            return self.local
        key = (self.path, self.device, self.identity.get("weights_hash"))
        cached = _WORKER_BASES.get(key)
        if cached is None or (clean and cached.has_adapters):
            _WORKER_BASES.clear()
            cached = self.load_private()
            _WORKER_BASES[key] = cached
        return cached

    def load_private(self) -> Base:
        """A copy of its own from `path` (never the shared one), checked hash for hash: for a caller that
        changes its weights (merging an adapter into it, say)."""
        base = load_base(self.path, self.device)
        mismatch = identity_mismatch(base.identity(), self.identity)
        if mismatch:
            raise ExpertkitError(f"the base at {self.path} is not the one expected ({mismatch[0][:-5]} hash differs): "
                                 "its files changed, or another model is there; every node must see the base the "
                                 "experts were trained on")
        return base
