"""Mixed-adapter batches at half PEFT's per-row cost: each adapter's LoRA delta only for its own rows.

PEFT's `adapter_names` path rebuilds Python index lists and gathers/scatters the rows in every LoRA layer of
every forward; at the batch sizes a server runs on small models that bookkeeping costs as much as the model
itself. Here the row groups are turned into index tensors once per forward, PEFT runs the bare base layers (no
adapter active), and a forward hook on each LoRA layer adds `scaling · B(A(x[rows]))` into those rows: the
same math as PEFT's, read from PEFT's own weights (nothing is copied). A row of an AdapterMix gets each
member's delta times its weight: the exact weighted sum of their ΔW, which PEFT itself has no per-row way to
apply. Layers this does not cover (DoRA and other LoRA variants, LoRA biases, merged adapters, non-Linear
layers) make `RowLoRA.build` return None, and the caller keeps PEFT's path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from expertkit.runtime.state import AdapterMix, RowAdapter


class RowLoRA:
    def __init__(self, layers: list):
        self.layers = layers
        # set only during a mixed forward: (adapter, its rows, per-row weights or None for all 1)
        self.groups: list[tuple[str, torch.Tensor, torch.Tensor | None]] | None = None
        self._hooked: set[int] = set()
        self._install()

    @classmethod
    def build(cls, peft_model) -> "RowLoRA | None":
        layers = lora_layers(peft_model)
        return cls(layers) if layers is not None else None

    def refresh(self, peft_model) -> bool:
        """After adapters were added: hook new LoRA layers; False if one of them is not covered."""
        layers = lora_layers(peft_model)
        if layers is None:
            return False
        self.layers = layers
        self._install()
        return True

    def _install(self) -> None:
        for layer in self.layers:
            if id(layer) not in self._hooked:
                layer.register_forward_hook(self._add_deltas)
                self._hooked.add(id(layer))

    @contextmanager
    def rows(self, adapters: list[RowAdapter], skip: str, device: torch.device):
        """Within this block, forwards add adapter `adapters[i]`'s delta to row i (none for `skip` rows;
        each member's delta times its weight for an AdapterMix)."""
        by_adapter: dict[str, tuple[list[int], list[float]]] = {}
        for row, adapter in enumerate(adapters):
            for name, weight in adapter.weights if isinstance(adapter, AdapterMix) else [(adapter, 1.0)]:
                if name != skip:
                    rows, weights = by_adapter.setdefault(name, ([], []))
                    rows.append(row)
                    weights.append(weight)
        self.groups = [(name, torch.tensor(rows, dtype=torch.long, device=device),
                        None if all(w == 1.0 for w in weights) else torch.tensor(weights, device=device))
                       for name, (rows, weights) in by_adapter.items()]
        try:
            yield
        finally:
            self.groups = None

    def _add_deltas(self, layer, args, output):
        if not self.groups:
            return output
        x = args[0]
        for adapter, index, weights in self.groups:
            if adapter not in layer.lora_A:
                continue
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            delta = F.linear(F.linear(x.index_select(0, index).to(a.dtype), a), b)
            if weights is not None:
                delta = delta * weights.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))
            output.index_add_(0, index, delta.to(output.dtype), alpha=layer.scaling[adapter])
        return output


def lora_layers(peft_model) -> list | None:
    """PEFT's plain LoRA Linear layers of the model, or None if any LoRA layer is something else."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    layers = []
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not Linear or module.merged or getattr(module, "lora_variant", None) or \
                any(b.bias is not None for b in module.lora_B.values()) or module.lora_embedding_A:
            return None
        layers.append(module)
    return layers
