"""Mixed-adapter batches at a fraction of PEFT's per-row cost: every row's own adapter delta, in two matmuls.

PEFT's `adapter_names` path rebuilds Python index lists and gathers/scatters the rows in every LoRA layer of
every forward; at the batch sizes a server runs on small models that bookkeeping costs as much as the model
itself. Here PEFT runs the bare base layers (no adapter active), and a forward hook on each LoRA layer adds
`Σ_k w[row, k] · scaling_k · B_k(A_k(x))` to every row: the adapters of the batch are stacked side by side
(A_1..A_k as one [k·r, in] matrix, B_1..B_k as one [out, k·r]), and each row's weights are zero in the
columns of the adapters it does not use, so the whole batch costs x @ A^T, a scale, and one multiply-add
into the output, whatever its mix of adapters (a base row adds exactly zero). The same math as PEFT's, read
from PEFT's own weights (stacked per forward, nothing kept). A row of an AdapterMix gets each member's delta
times its weight: the exact weighted sum of their ΔW, which PEFT itself has no per-row way to apply. Layers
this does not cover (DoRA and other LoRA variants, LoRA biases, merged adapters, non-Linear layers) make
`RowLoRA.build` return None, and the caller keeps PEFT's path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from expertkit.runtime.state import AdapterMix, RowAdapter


class RowLoRA:
    def __init__(self, layers: list):
        self.layers = layers
        self.batch: _Batch | None = None  # set only during a mixed forward
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
        names: dict[str, int] = {}  # adapter -> its column in `weights`
        cells: list[tuple[int, int, float]] = []
        for row, adapter in enumerate(adapters):
            for name, weight in adapter.weights if isinstance(adapter, AdapterMix) else [(adapter, 1.0)]:
                if name != skip:
                    cells.append((row, names.setdefault(name, len(names)), weight))
        table = [[0.0] * len(names) for _ in adapters]
        for row, column, weight in cells:
            table[row][column] += weight
        self.batch = _Batch(list(names), torch.tensor(table, device=device)) if names else None
        try:
            yield
        finally:
            self.batch = None

    def _add_deltas(self, layer, args, output):
        """output += Σ_adapters weight[row, adapter] · scaling · B(A x), for all adapters in two matmuls.

        The adapters' A (and B) are stacked side by side, so a batch over k adapters costs two matmuls of
        rank k·r instead of k pairs of gathers, matmuls and scatters; a row's weights are zero in the
        columns of adapters it does not use, and a base row adds exactly zero.
        """
        batch = self.batch
        if batch is None:
            return output
        present = tuple(i for i, name in enumerate(batch.names) if name in layer.lora_A)
        if not present:
            return output
        names = [batch.names[i] for i in present]
        a_parts = [layer.lora_A[n].weight for n in names]
        b_parts = [layer.lora_B[n].weight for n in names]
        a = a_parts[0] if len(names) == 1 else torch.cat(a_parts)
        b = b_parts[0] if len(names) == 1 else torch.cat(b_parts, dim=1)
        columns = batch.columns(present, tuple(p.shape[0] for p in a_parts),
                                tuple(float(layer.scaling[n]) for n in names))
        x = args[0]
        h = F.linear(x.to(a.dtype), a)
        h = h * columns.to(h.dtype).view(columns.shape[0], *[1] * (h.dim() - 2), columns.shape[1])
        if output.dtype == h.dtype and output.is_contiguous():  # added inside the matmul: no full-size temporary
            output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t())
        else:
            output.add_(F.linear(h, b).to(output.dtype))
        return output


class _Batch:
    """One forward's rows: its adapters in column order and each row's weight on each (0: not used)."""

    def __init__(self, names: list[str], weights: torch.Tensor):
        self.names, self.weights = names, weights
        self._columns: dict[tuple, torch.Tensor] = {}

    def columns(self, present: tuple[int, ...], ranks: tuple[int, ...], scalings: tuple[float, ...]) -> torch.Tensor:
        """[rows, Σ ranks]: each row's weight times the layer's scaling, repeated over each adapter's rank.
        Computed once per forward for each (adapters, ranks, scalings) that its layers have."""
        key = (present, ranks, scalings)
        if key not in self._columns:
            scaled = self.weights[:, list(present)] * torch.tensor(scalings, device=self.weights.device)
            self._columns[key] = scaled.repeat_interleave(torch.tensor(ranks, device=self.weights.device), dim=1)
        return self._columns[key]


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
