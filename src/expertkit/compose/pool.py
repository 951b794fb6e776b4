"""One base model in memory with every library adapter attached by name.

Rows of one batch may use different adapters, which is what makes many experts
cheap: the base weights are held once and one forward serves a mixed batch (each
adapter's delta on its own rows: row_lora.py, or PEFT's per-row `adapter_names`).
"""

from __future__ import annotations

import contextlib

import torch

from expertkit.base import Base
from expertkit.compose.base import DecodeState
from expertkit.errors import ExpertkitError
from expertkit.library import Entry, Library

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter on this row"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ExpertPool:
    def __init__(self, base: Base, library: Library | None = None, names: list[str] | None = None):
        self.base = base
        self.library = library
        self.entries: list[Entry] = []
        self.model = base.model
        if library is None:
            return
        identity = base.identity()
        library.check_base(identity, what=f"library {library.root}")
        wanted = library.entries() if names is None else [library.get(n) for n in names]
        for entry in wanted:
            library.check_entry(entry, identity)
        self._attach(wanted)

    def _attach(self, entries: list[Entry]) -> None:
        """Load adapter entries into the base's one PeftModel (created on first use, shared by every pool)."""
        from peft import PeftModel

        model = self.base.peft_model
        loaded = self.base.adapter_versions
        for entry in entries:
            self.entries.append(entry)
            if not entry.is_adapter:
                continue  # a full model (merged_model) brings its own weights; its composition loads them
            version = entry.manifest.get("created")
            if model is None:
                model = PeftModel.from_pretrained(self.base.model, str(entry.path), adapter_name=entry.name,
                                                  low_cpu_mem_usage=True)
                self.base.peft_model = model
            elif loaded.get(entry.name) != version:
                if entry.name in model.peft_config:  # rewritten on disk since it was loaded: drop the stale copy
                    model.delete_adapter(entry.name)
                model.load_adapter(str(entry.path), adapter_name=entry.name, low_cpu_mem_usage=True)
            loaded[entry.name] = version
        if model is not None:
            self.model = model.eval()
            model._expertkit_active = None  # loading may touch PEFT's active set: re-set it on the next forward
            self._hook_rows(model)

    def _hook_rows(self, model) -> None:
        """Mixed batches through RowLoRA when every LoRA layer allows it (PEFT's `adapter_names` otherwise)."""
        from expertkit.compose.row_lora import RowLoRA

        if self.base.row_lora is None:
            self.base.row_lora = RowLoRA.build(model) or False
        elif self.base.row_lora and not self.base.row_lora.refresh(model):
            self.base.row_lora = False

    def ensure(self, names: list[str]) -> None:
        """Attach library entries this pool does not hold yet (a router or a mixture needs its experts)."""
        held = {e.name for e in self.entries}
        missing = [n for n in dict.fromkeys(names) if n not in held]
        if not missing:
            return
        if self.library is None:
            raise ExpertkitError(f"entries {missing} are needed but this pool has no library; load one")
        entries = [self.library.get(n) for n in missing]
        for entry in entries:
            self.library.check_entry(entry, self.base.identity())
        self._attach(entries)

    @property
    def context_length(self) -> int | None:
        return getattr(self.base.model.config, "max_position_embeddings", None)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def adapter_names(self) -> list[str]:
        return [e.name for e in self.entries if e.is_adapter]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[str],
                past=None, position_ids: torch.Tensor | None = None, **model_kwargs):
        """One forward where row i uses adapter `adapters[i]` (BASE_ADAPTER for the bare base)."""
        unknown = sorted(set(adapters) - set(self.adapter_names) - {BASE_ADAPTER})
        if unknown:
            raise ExpertkitError(f"adapter(s) {unknown} are not loaded; loaded: {self.adapter_names}")
        # Without adapters the pool is just the base model. With them, a batch whose rows all want one
        # adapter runs it as PEFT's active adapter (switching when needed); a mixed batch adds each
        # adapter's delta to its own rows (RowLoRA, or PEFT's slower `adapter_names` routing).
        kwargs = {}
        rows = contextlib.nullcontext()
        if self.model is not self.base.model:
            if len(set(adapters)) == 1:
                self._activate(adapters[0])
            elif self.base.row_lora:  # the base for every row, plus each adapter's delta on its own rows
                self._activate(BASE_ADAPTER)
                rows = self.base.row_lora.rows(adapters, BASE_ADAPTER, self.device)
            else:
                kwargs = {"adapter_names": list(adapters)}
        with rows:
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                              position_ids=position_ids.to(self.device) if position_ids is not None else None,
                              past_key_values=past, use_cache=True, **kwargs, **model_kwargs)

    def _activate(self, adapter: str) -> None:
        """Make `adapter` the one PEFT applies to every row (none at all for BASE_ADAPTER)."""
        wanted = [] if adapter == BASE_ADAPTER else [adapter]
        if getattr(self.model, "_expertkit_active", None) != wanted:  # the PeftModel is shared by every pool
            self.model.base_model.set_adapter(wanted, inference_mode=True)
            self.model._expertkit_active = wanted

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[str], **model_kwargs):
        positions = position_ids(attention_mask)
        out = self.forward(input_ids, attention_mask, adapters, position_ids=positions, **model_kwargs)
        state = DecodeState(out.past_key_values, attention_mask.to(self.device), positions[:, -1].to(self.device) + 1)
        return out.logits, state

    def step(self, state: DecodeState, next_ids: torch.Tensor, adapters: list[str]):
        mask = torch.cat([state.attention_mask, torch.ones_like(state.attention_mask[:, :1])], dim=1)
        out = self.forward(next_ids.view(-1, 1), mask, adapters, past=state.past,
                           position_ids=state.next_position.view(-1, 1))
        return out.logits[:, -1], DecodeState(out.past_key_values, mask, state.next_position + 1, state.extra)
