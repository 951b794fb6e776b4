"""Can a library's experts be carried to a new base? Same architecture, same tokenizer, same adapted shapes.

Each check refuses with the exact difference (which config key, which token, which module and shapes),
before anything is written: a LoRA delta only means something on the modules and token ids it was
trained on.
"""

from __future__ import annotations

from pathlib import Path

from expertkit.base import Base, identity_mismatch
from expertkit.errors import ExpertkitError
from expertkit.library import ADAPTER_WEIGHTS, Entry

LORA_SIDES = {".lora_A.weight": 1, ".lora_B.weight": 0}  # weight suffix -> the dim that equals the module's
# in_features (A: [r, in]) or out_features (B: [out, r]); index into the module weight's [out, in]
PEFT_PREFIX = "base_model.model."


def check_new_base(old: Base, new: Base, adapters: list[Entry]) -> None:
    """Refuse a new base the adapters cannot be carried to, naming the first difference found."""
    if not identity_mismatch(new.identity(), old.identity()):
        raise ExpertkitError(f"the library is already on {new.name} (same config, weights and tokenizer as its base "
                             f"{old.name}); pass the updated base with --to")
    old_type, new_type = old.model.config.model_type, new.model.config.model_type
    if old_type != new_type:
        raise ExpertkitError(f"the new base {new.name} is a '{new_type}' model and the library's base a '{old_type}': "
                             "experts carry over only between versions of one architecture; retrain them on the "
                             "new base instead")
    difference = tokenizer_difference(old.tokenizer, new.tokenizer)
    if difference:
        raise ExpertkitError(f"the new base {new.name} has another tokenizer than the library's base ({difference}): "
                             "the experts' deltas are tied to token ids; retrain them on the new base instead")
    for entry in adapters:
        problem = shape_difference(entry.path, new.model)
        if problem:
            raise ExpertkitError(f"{entry.kind} '{entry.name}' cannot be carried to {new.name}: {problem}; "
                                 "the new base's shapes differ, retrain this expert on it")


def tokenizer_difference(old, new) -> str | None:
    """The first difference between two tokenizers' vocabularies and special tokens, in words; None if equal."""
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    if len(old_vocab) != len(new_vocab):
        return f"vocabulary of {len(new_vocab)} tokens vs {len(old_vocab)}"
    for token, index in sorted(old_vocab.items(), key=lambda item: item[1]):
        if new_vocab.get(token) != index:
            found = "absent" if token not in new_vocab else f"id {new_vocab[token]}"
            return f"token {token!r} is id {index} in the old vocabulary, {found} in the new one"
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(old, role, None) != getattr(new, role, None):
            return f"{role} {getattr(new, role, None)!r} vs {getattr(old, role, None)!r}"
    if sorted(old.all_special_tokens) != sorted(new.all_special_tokens):
        return f"special tokens {sorted(new.all_special_tokens)} vs {sorted(old.all_special_tokens)}"
    return None


def shape_difference(adapter_dir: Path, model) -> str | None:
    """The first adapted module of `adapter_dir` that `model` lacks or holds with other in/out features."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in sorted(f.keys()):
            suffix = next((s for s in LORA_SIDES if key.endswith(s)), None)
            if suffix is None:
                continue
            module_name = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
            try:
                weight = model.get_submodule(module_name).weight
            except AttributeError:
                return f"the new base has no module {module_name}"
            side = LORA_SIDES[suffix]
            wanted = f.get_slice(key).get_shape()[side]
            if weight.shape[side] != wanted:
                features = "in_features" if side == 1 else "out_features"
                return (f"module {module_name} has {features} {weight.shape[side]} in the new base, "
                        f"{wanted} in the library's base")
    return None
