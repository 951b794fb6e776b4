"""A companion's first weights cut out of its teacher, so distillation starts near the teacher, not from noise.

A companion distilled from noise stays far from its teacher (SmolLM2-135M: perplexity 102 against the
teacher's 13.6 after 1,000 steps), and proxy-tuning transfers a small expert's change only as well as the
small model reads text the way the large one does. So, for a Llama-architecture teacher (RMSNorm, SwiGLU MLP,
rotary attention), the companion is a smaller copy of it:

- width: the same d of the D residual coordinates in every kept layer (weight selection): those carrying the
  most of what the kept layers and the final norm read (their RMS-normalized inputs) on calibration text. The
  student's norm gains are the teacher's times sqrt(D/d), which keeps a cut vector's RMS where the full one's
  was. Coordinates, not principal directions: a rotation would not commute with the final norm's gain, which a
  tied head cannot absorb (a full-width rotated SmolLM2 scored perplexity 1,723 against the teacher's 37);
- depth: the layers that change the residual stream most (1 - cosine of a layer's input and output:
  ShortGPT's block influence), in their order;
- MLP width: per kept layer, the neurons with the largest mean |activation| x |output weight|;
- attention heads: all of the teacher's, with its head size and rotary settings (q/k/v/o are cut along the
  residual side only).

The student stays a plain Llama with tied embeddings (the kept columns of the teacher's input embedding; a
teacher with a separate output head lends the companion its input embedding for both), so every tool loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_TYPES = ("llama",)


def teacher_init_unsupported(model) -> str | None:
    """Why the teacher cannot be cut into a companion (None: it can)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"its architecture is {cfg.model_type!r} (the cut copies Llama layers: {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "its linear layers have biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"its MLP activation is {cfg.hidden_act!r}, not silu"
    return None


def cut_config(teacher_model, num_layers: int, hidden_size: int, intermediate_size: int, tokenizer):
    """The teacher's Llama config, narrowed and made shallower; heads, head size, rotary and norm settings kept."""
    from transformers import LlamaConfig

    raw = teacher_model.config.to_dict()
    for key in ("architectures", "_name_or_path", "auto_map", "transformers_version", "dtype", "torch_dtype"):
        raw.pop(key, None)
    t_cfg = teacher_model.config
    raw.update(num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
               head_dim=getattr(t_cfg, "head_dim", None) or t_cfg.hidden_size // t_cfg.num_attention_heads,
               tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(**raw)


@dataclass
class Calibration:
    """What the teacher does on calibration text, per layer: the energy of each coordinate of its normalized input,
    how much it turns the residual stream, and each MLP neuron's importance."""

    input_energy: torch.Tensor  # [L + 1, D]: each layer's normalized input; the last is the final norm's
    influence: torch.Tensor  # [L]
    neuron_importance: torch.Tensor  # [L, I]


def _normalized(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h / h.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()


@torch.no_grad()
def calibrate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8) -> Calibration:
    """Run the teacher over the calibration blocks, recording what each layer reads and writes."""
    layers = model.model.layers
    n, width, device = len(layers), model.config.hidden_size, next(model.parameters()).device
    energy = torch.zeros(n + 1, width, dtype=torch.float64, device=device)
    turn = torch.zeros(n, dtype=torch.float64, device=device)
    importance = torch.zeros(n, model.config.intermediate_size, dtype=torch.float64, device=device)
    state = {"mask": None, "inputs": [None] * n}

    def real(h):  # the real positions' vectors, [tokens, D]
        return h[state["mask"]]

    def before(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            energy[i] += _normalized(real(h)).pow(2).sum(0)
            state["inputs"][i] = real(h).double()
        return hook

    def after(i):
        def hook(module, args, kwargs, output):
            out = real(output[0] if isinstance(output, tuple) else output).double()
            turn[i] += (1 - torch.nn.functional.cosine_similarity(state["inputs"][i], out, dim=-1)).sum()
            if i == n - 1:
                energy[n] += _normalized(out).pow(2).sum(0)
        return hook

    def neurons(i):
        def hook(module, args):
            importance[i] += real(args[0]).double().abs().sum(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.register_forward_pre_hook(before(i), with_kwargs=True),
                    layer.register_forward_hook(after(i), with_kwargs=True),
                    layer.mlp.down_proj.register_forward_pre_hook(neurons(i))]
    try:
        for start in range(0, len(input_ids), batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            mask = attention_mask[start:start + batch_size].to(device)
            state["mask"] = mask.bool()
            model.model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    tokens = float(attention_mask.sum())
    out_norms = torch.stack([layer.mlp.down_proj.weight.double().norm(dim=0) for layer in layers])
    return Calibration((energy / tokens).cpu(), (turn / tokens).cpu(), (importance / tokens * out_norms).cpu())


def kept_layers(calibration: Calibration, count: int) -> list[int]:
    """The `count` layers with the largest block influence, in the teacher's order."""
    order = torch.argsort(calibration.influence, descending=True)[:count]
    return sorted(int(i) for i in order)


def kept_coordinates(calibration: Calibration, layers: list[int], width: int) -> tuple[torch.Tensor, float]:
    """The `width` residual coordinates that the kept layers and the final norm read most, in order; and the
    share of that energy they keep."""
    energy = calibration.input_energy[[*layers, -1]].sum(0)
    top = torch.argsort(energy, descending=True)[:width]
    return top.sort().values, float(energy[top].sum() / energy.sum())


@torch.no_grad()
def cut_from_teacher(student, teacher_model, calibration: Calibration) -> dict:
    """Fill `student` (built by cut_config) with the teacher's kept layers, coordinates and neurons; returns
    what was kept."""
    s_cfg, t_cfg = student.config, teacher_model.config
    layers = kept_layers(calibration, s_cfg.num_hidden_layers)
    dims, kept_share = kept_coordinates(calibration, layers, s_cfg.hidden_size)
    dims = dims.to(next(teacher_model.parameters()).device)
    scale = math.sqrt(t_cfg.hidden_size / s_cfg.hidden_size)

    def copy(target, source):
        target.copy_(source.to(target.dtype))

    copy(student.get_input_embeddings().weight, teacher_model.get_input_embeddings().weight[:, dims])
    for s_layer, t_index in zip(student.model.layers, layers):
        t_layer = teacher_model.model.layers[t_index]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            copy(getattr(s_layer, norm).weight, scale * getattr(t_layer, norm).weight[dims])
        for name in ("q_proj", "k_proj", "v_proj"):  # they read the stream
            copy(getattr(s_layer.self_attn, name).weight, getattr(t_layer.self_attn, name).weight[:, dims])
        copy(s_layer.self_attn.o_proj.weight, t_layer.self_attn.o_proj.weight[dims])  # it writes the stream
        neurons = torch.argsort(calibration.neuron_importance[t_index], descending=True)[:s_cfg.intermediate_size]
        neurons = neurons.sort().values.to(dims.device)
        for name in ("gate_proj", "up_proj"):
            copy(getattr(s_layer.mlp, name).weight, getattr(t_layer.mlp, name).weight[neurons][:, dims])
        copy(s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight[dims][:, neurons])
    copy(student.model.norm.weight, scale * teacher_model.model.norm.weight[dims])
    return {"teacher_layers": layers, "residual_share_kept": round(kept_share, 4)}
