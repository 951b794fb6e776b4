"""One base model in memory with every library adapter attached by name; the one place that runs it.

Rows of one batch may use different adapters, which is what makes many experts cheap: the base
weights are held once and one forward serves a mixed batch. The pool chooses the forward path:
PEFT's active adapter when every row wants the same one, RowLoRA (row_lora.py) for a mixed batch
when its layers allow it, PEFT's per-row `adapter_names` otherwise; and for decode steps a caller
may ask for (a collaboration's small model), the lean step of lean.py when it covers the model.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from expertkit.base import Base
from expertkit.errors import ExpertkitError
from expertkit.library import Entry, Library
from expertkit.runtime.hf_cache import cache_keyword, returned_cache
from expertkit.runtime.lean import LeanDecoder, LeanState
from expertkit.runtime.memory import release_freed_memory
from expertkit.runtime.row_lora import RowLoRA
from expertkit.runtime.state import BASE_ADAPTER, AdapterMix, PoolState, RowAdapter
from expertkit.runtime.tokens import position_ids
from expertkit.runtime.vocab_head import use_vocab_head

log = logging.getLogger("expertkit.runtime")


@dataclass
class AdapterHost:
    """The one PeftModel that holds a base model's attached adapters, shared by every pool on that base.

    PEFT injects LoRA layers into the base model's own modules, so two PeftModels on one base would
    fight over them: every pool on a base goes through its host. An entry rewritten on disk is loaded
    as a new version under a PEFT name of its own (`name@2`), so rows that started on the old weights
    can finish on them; old versions are deleted once no live row uses them.
    """

    model: object  # peft.PeftModel
    current: dict[str, tuple[str, tuple]] = field(default_factory=dict)  # entry -> (PEFT name, version_of(entry))
    entry_of: dict[str, str] = field(default_factory=dict)  # PEFT name -> entry name, every version held
    loads: dict[str, int] = field(default_factory=dict)  # entry -> versions loaded so far
    row_lora: RowLoRA | None = None  # None when some LoRA layer is not one RowLoRA handles
    active: list[str] | None = None  # the adapters PEFT applies to every row right now
    generic_said: bool = False  # the log already says that mixed batches take PEFT's path

    def activate(self, adapter: str) -> None:
        """Make `adapter` the one PEFT applies to every row (none at all for BASE_ADAPTER)."""
        wanted = [] if adapter == BASE_ADAPTER else [adapter]
        if self.active != wanted:
            self.model.base_model.set_adapter(wanted, inference_mode=True)
            self.active = wanted

    def holds(self, entry: Entry) -> bool:
        """Whether the current version of `entry` is the one on disk now."""
        return entry.name in self.current and self.current[entry.name][1] == version_of(entry)

    def load(self, entry: Entry) -> None:
        """Load `entry`'s adapter as its current version (a new PEFT name when an older one is held)."""
        version = self.loads.get(entry.name, 0) + 1
        name = entry.name if version == 1 else f"{entry.name}@{version}"
        self.model.load_adapter(str(entry.path), adapter_name=name, low_cpu_mem_usage=True)
        self.record(entry, name)

    def record(self, entry: Entry, name: str) -> None:
        """`entry`'s weights are loaded under PEFT name `name`: new rows asking for `entry` run on them."""
        self.loads[entry.name] = self.loads.get(entry.name, 0) + 1
        self.current[entry.name] = (name, version_of(entry))
        self.entry_of[name] = entry.name

    def retire(self, entry: str) -> None:
        """`entry` is no longer served: new rows cannot ask for it (its rows in flight still run)."""
        self.current.pop(entry, None)

    def drop_unused(self, live: set[str]) -> None:
        """Delete every PEFT adapter that is no entry's current version and that no row in `live` uses."""
        current = {name for name, _ in self.current.values()}
        unused = [n for n in self.entry_of if n not in current and n not in live]
        for name in unused:
            if len(self.model.peft_config) == 1:
                break  # a PeftModel cannot run without one adapter config: the last one stays, unused
            if name in self.model.active_adapters:  # PEFT warns on deleting the active one: make another active
                self.model.base_model.set_adapter(next(n for n in self.model.peft_config if n != name),
                                                  inference_mode=True)
            self.model.delete_adapter(name)
            del self.entry_of[name]
        if unused:
            if self.model.active_adapter not in self.model.peft_config:  # PEFT keeps a deleted name when none
                self.model.active_adapter = next(iter(self.model.peft_config))  # was active (the bare base)
            self.active = None


def version_of(entry: Entry) -> tuple:
    """What tells two versions of an entry apart: its folder (two libraries on one base may both hold a
    "medical", and a copied library keeps its manifests) and when it was written."""
    return str(Path(entry.path).resolve()), entry.manifest.get("created")


# base -> its host; weak, so a base that is dropped takes its adapters with it (a host never refers to its Base)
_HOSTS: "weakref.WeakKeyDictionary[Base, AdapterHost]" = weakref.WeakKeyDictionary()


class ExpertPool:
    def __init__(self, base: Base, library: Library | None = None, names: list[str] | None = None):
        self.base = base
        self.library = library
        self.entries: list[Entry] = []
        self.host: AdapterHost | None = _HOSTS.get(base)
        use_vocab_head(base.model)  # decode steps: the fast few-row head product on CPU (runtime.vocab_head)
        if library is None:
            return
        identity = base.identity()
        library.check_base(identity, what=f"library {library.root}")
        wanted = library.entries() if names is None else [library.get(n) for n in names]
        for entry in wanted:
            library.check_entry(entry, identity)
        self._attach(wanted)

    def _attach(self, entries: list[Entry], live: set[str] = frozenset()) -> None:
        """Load adapter entries into the base's host (created on first use); an entry rewritten since it was
        loaded gets a new version, and the old one goes unless a row in `live` still uses it."""
        from peft import PeftModel

        loaded = False
        for entry in entries:
            self.entries = [e for e in self.entries if e.name != entry.name] + [entry]
            if not entry.is_adapter:
                continue  # a full model (merged_model) brings its own weights; its composition loads them
            if self.host is None:
                model = PeftModel.from_pretrained(self.base.model, str(entry.path), adapter_name=entry.name,
                                                  low_cpu_mem_usage=True)
                self.host = _HOSTS[self.base] = AdapterHost(model.eval())
                self.host.record(entry, entry.name)
                loaded = True
            elif not self.host.holds(entry):
                self.host.load(entry)
                loaded = True
        if self.host is not None:
            self.host.active = None  # loading may touch PEFT's active set: re-set it on the next forward
            self.host.drop_unused(set(live))
            host = self.host
            host.row_lora = RowLoRA.build(host.model) if host.row_lora is None \
                else host.row_lora if host.row_lora.refresh(host.model) else None
            if host.row_lora is None and not host.generic_said:
                host.generic_said = True
                log.info("row-wise LoRA does not cover these adapters' layers (a LoRA variant or a layer type it "
                         "lacks): mixed batches use PEFT's per-row adapter_names")
        if loaded:
            release_freed_memory()  # the files' temporary copies, so resident memory is the adapters themselves

    def sync(self, live: set[str], only: set[str] | None = None) -> dict:
        """Hold what the library holds now (of `only`, when given): new and rewritten entries attached,
        removed ones retired.

        Rows in flight keep the weights they started on (`live`: the PEFT names they use). Entries that
        fail their checks (another base, a corrupted file) are left out and named in the report; a library
        of another base, or one that cannot be read, changes nothing and raises.
        """
        identity, held = self.base.identity(), {e.name: e for e in self.entries}
        self.library.check_base(identity, what=f"library {self.library.root}")
        found, refused = {}, {}
        for entry in [e for e in self.library.entries() if only is None or e.name in only]:
            try:
                self.library.check_entry(entry, identity)
                found[entry.name] = entry
            except ExpertkitError as e:
                refused[entry.name] = str(e)
        changed = [e for name, e in found.items() if name not in held or version_of(held[name]) != version_of(e)]
        removed = [name for name in held if name not in found]
        for name in removed:
            if self.host is not None:
                self.host.retire(name)
        self.entries = [e for e in self.entries if e.name not in removed]
        self._attach(changed, live)
        return {"added": [e.name for e in changed if e.name not in held],
                "updated": [e.name for e in changed if e.name in held], "removed": removed, "refused": refused}

    def resolve(self, adapters: list[RowAdapter]) -> list[RowAdapter]:
        """Entry names as the PEFT names of their current versions (what a new row runs on)."""
        if self.host is None:
            return list(adapters)
        def peft(name: str) -> str:
            return self.host.current[name][0] if name in self.host.current else name

        return [AdapterMix(tuple((peft(n), w) for n, w in a.weights)) if isinstance(a, AdapterMix) else peft(a)
                for a in adapters]

    def entry_name(self, adapter: RowAdapter) -> str:
        """The library entry (or mix of entries) a row's PEFT adapter name belongs to."""
        if isinstance(adapter, AdapterMix):
            return str(AdapterMix(tuple((self.entry_name(n), w) for n, w in adapter.weights)))
        return self.host.entry_of.get(adapter, adapter) if self.host is not None else adapter

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
    def model(self) -> torch.nn.Module:
        """What runs a forward: the PeftModel once adapters are attached, the bare base model before."""
        return self.host.model if self.host is not None else self.base.model

    @property
    def context_length(self) -> int | None:
        return self.base.context_length

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
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[RowAdapter],
                past=None, position_ids: torch.Tensor | None = None, **model_kwargs):
        """One forward where row i uses adapter `adapters[i]` (BASE_ADAPTER for the bare base, an AdapterMix
        for a weighted sum of adapters)."""
        mixes = any(isinstance(a, AdapterMix) for a in adapters)
        named = {n for a in adapters for n in (a.adapters if isinstance(a, AdapterMix) else [a])}
        unknown = sorted(named - set(self.host.entry_of if self.host is not None else ()) - {BASE_ADAPTER})
        if unknown:
            raise ExpertkitError(f"adapter(s) {unknown} are not loaded; loaded: {self.adapter_names}")
        kwargs = {}
        rows = contextlib.nullcontext()
        if self.host is not None:
            if len(set(adapters)) == 1 and not mixes:
                self.host.activate(adapters[0])
            elif self.host.row_lora is not None:  # the base for every row, plus each adapter's delta on its rows
                self.host.activate(BASE_ADAPTER)
                rows = self.host.row_lora.rows(adapters, BASE_ADAPTER, self.device)
            elif mixes:
                raise ExpertkitError("weighted adapter mixes need plain LoRA layers, and these adapters use a LoRA "
                                     "variant; pin the mix as a merge instead (expertkit merge --method linear)")
            else:
                kwargs = {"adapter_names": list(adapters)}
        kwargs[cache_keyword(self.base.model)] = past
        with rows:
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                              position_ids=position_ids.to(self.device) if position_ids is not None else None,
                              use_cache=True, **kwargs, **model_kwargs)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[RowAdapter],
                keep_last: int | None = None, **model_kwargs) -> tuple[torch.Tensor, PoolState]:
        adapters = self.resolve(adapters)
        positions = position_ids(attention_mask)
        if keep_last:
            model_kwargs["logits_to_keep"] = keep_last
        # A plain DynamicCache keeps every layer's keys whole, sliding-window layers too (their attention
        # mask still applies the window), so a server can join and trim rows of it (kvcache.py).
        out = self.forward(input_ids, attention_mask, adapters, past=DynamicCache(), position_ids=positions,
                           **model_kwargs)
        state = PoolState(returned_cache(out), attention_mask.to(self.device), positions[:, -1].to(self.device) + 1,
                          list(adapters), self)
        return out.logits, state

    def extend(self, state: PoolState, next_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, PoolState]:
        """Several tokens per row at once: next_ids [B, n], left-padded where `mask` [B, n] is 0.

        For a reader whose rows advance by different numbers of tokens per step (a small model reading a
        large model's text in its own tokens: compose/vocab.py); returns logits [B, n, V] (the last column is
        each row's next-token prediction) and the state after every row's real tokens.
        """
        mask = mask.to(self.device)
        full = torch.cat([state.attention_mask, mask], dim=1)
        positions = state.next_position.view(-1, 1) + position_ids(mask)
        out = self.forward(next_ids, full, state.adapters, past=state.past, position_ids=positions)
        return out.logits, PoolState(returned_cache(out), full, state.next_position + mask.sum(1), state.adapters, self)

    def step(self, state: PoolState | LeanState, next_ids: torch.Tensor,
             lean: bool = False) -> tuple[torch.Tensor, PoolState | LeanState]:
        """One token per row, each row on the adapter its state says.

        `lean`: move the cache into the lean decode step (lean.py) when it covers this model and these
        adapters, and keep stepping there; the rows of such a state stay in their own batch.
        """
        if lean and isinstance(state, PoolState) and not any(isinstance(a, AdapterMix) for a in state.adapters):
            decoder = LeanDecoder.build(self.base.model, list(dict.fromkeys(state.adapters)))
            if decoder is not None:
                state = decoder.start(state.past, state.attention_mask, state.next_position, state.adapters)
        if isinstance(state, LeanState):
            return state.decoder.step(state, next_ids)
        logits, state = self.extend(state, next_ids.view(-1, 1), torch.ones_like(state.attention_mask[:, :1]))
        return logits[:, -1], state

