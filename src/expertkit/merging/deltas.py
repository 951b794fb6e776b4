"""Read each expert's real weight update ΔW = scale · B · A per target module, via PEFT itself.

Going through PEFT's `LoraLayer.get_delta_weight` means rsLoRA, differing alphas,
rank_pattern/alpha_pattern and fan_in_fan_out are honoured exactly as PEFT
applies them at inference. Variants whose update is not a plain ΔW (DoRA,
LoRA biases, modules_to_save, ...) are refused instead of being merged wrongly.
"""

from __future__ import annotations

import json

import torch

from expertkit.errors import ExpertkitError
from expertkit.library import Entry

# adapter_config.json fields whose non-default value changes the function beyond ΔW = scale · B · A
UNSUPPORTED = {
    "use_dora": "DoRA (weight magnitudes are not a ΔW)",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "target_parameters": "parameter targets (target_parameters)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


def check_mergeable(entry: Entry) -> dict:
    """The adapter's config, or a clear error naming the feature that cannot be merged as a ΔW."""
    config = json.loads((entry.path / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ExpertkitError(f"'{entry.name}' is a {config['peft_type']} adapter; only LoRA adapters can be merged")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ExpertkitError(f"'{entry.name}' uses {what} ({key}); expertkit cannot merge it exactly, so it "
                                 "refuses rather than merge it wrong")
    if config.get("bias", "none") != "none":
        raise ExpertkitError(f"'{entry.name}' trains biases (bias={config['bias']}); only bias='none' merges as ΔW")
    return config


def lora_layers(peft_model, adapter: str) -> dict[str, torch.nn.Module]:
    """module name (as in the base model) -> the LoRA layer holding `adapter`."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            found[name.removeprefix("base_model.model.")] = module
    return found


@torch.no_grad()
def expert_deltas(pool, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {expert: ΔW}} in float32 on the CPU for the experts loaded in `pool` (same target modules
    required). On the CPU whatever device the pool runs on: the merge arithmetic (SVD factors, sparsification)
    builds its tensors there, the full-model merge adds ΔW to a base loaded there, and a search moves each
    merged ΔW to the model's device itself."""
    if not names:
        raise ExpertkitError("no experts to merge: name at least one library entry")
    by_expert = {}
    for name in names:
        entry = next((e for e in pool.entries if e.name == name), None)
        if entry is None:
            raise ExpertkitError(f"'{name}' is not a library adapter; known: {pool.adapter_names}")
        check_mergeable(entry)
        (loaded,) = pool.resolve([name])  # the PEFT name of its current version
        by_expert[name] = {m: layer.get_delta_weight(loaded).float().cpu()
                           for m, layer in lora_layers(pool.model, loaded).items()}
    modules = {n: sorted(d) for n, d in by_expert.items()}
    first = names[0]
    for n in names[1:]:
        if modules[n] != modules[first]:
            only_a = sorted(set(modules[first]) - set(modules[n]))[:3]
            only_b = sorted(set(modules[n]) - set(modules[first]))[:3]
            raise ExpertkitError(f"'{first}' and '{n}' adapt different target modules (only in {first}: {only_a}, "
                                 f"only in {n}: {only_b}); merge experts trained with the same target_modules")
    return {m: {n: by_expert[n][m] for n in names} for m in modules[first]}

