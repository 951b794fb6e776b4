"""The expert library on disk: PEFT adapter dirs + manifests, atomic writes, base compatibility.

    library/
      library.json            base identity, tokenizer hash, list of entries
      experts/<name>/         adapter_config.json, adapter_model.safetensors, expert.json
      merges/<name>/          same form (written by merge strategies)
      routers/<name>/         router.json + router.safetensors + expert.json (experts, calibrated threshold)
      mixtures/<name>/        mixture.json (experts, top-k) + expert.json
      .checkpoints/<name>/    training checkpoints (resume after a crash)

Each entry dir is a standard PEFT adapter, so `PeftModel.from_pretrained(base, dir)` and
`vllm serve --lora-modules name=dir` load it unchanged. Only safetensors are ever loaded.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from expertkit.base import identity_mismatch
from expertkit.errors import ExpertkitError
from expertkit.fsutil import atomic_dir, atomic_write_text, ensure_writable_dir

LIBRARY_FORMAT = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
MANIFEST = "expert.json"
BASE = "base"  # the bare base model's name wherever compositions are named: scorecard, routers, server


class Kind(str, Enum):
    """What a library entry is (the value is what manifests and library.json store)."""

    EXPERT = "expert"
    MERGE = "merge"  # a LoRA merge: an adapter like an expert
    MERGED_MODEL = "merged_model"  # a full-model merge: its own weights
    ROUTER = "router"
    MIXTURE = "mixture"

    def __str__(self) -> str:
        return self.value

ROUTER_STATE = ("router.json", "router.safetensors")
MIXTURE_SPEC = "mixture.json"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    path: Path
    manifest: dict

    @property
    def domain(self) -> str | None:
        return self.manifest.get("domain")

    @property
    def is_adapter(self) -> bool:
        """Experts and LoRA merges are PEFT adapters; a merged full model is not."""
        return self.kind in KINDS and KINDS[Kind(self.kind)].validate is validate_adapter_dir


def validate_adapter_dir(path: Path) -> None:
    """Refuse pickle-only adapters and corrupted safetensors with a message that says what to do."""
    from safetensors import SafetensorError, safe_open

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
        if pickles:
            raise ExpertkitError(
                f"{path}: only pickle weights ({pickles[0]}); expertkit loads safetensors only because pickle can "
                "run code. Convert it with safetensors.torch.save_file and retry"
            )
        raise ExpertkitError(f"{path}: no {ADAPTER_WEIGHTS}; this is not a PEFT adapter dir")
    if not (path / "adapter_config.json").is_file():
        raise ExpertkitError(f"{path}: no adapter_config.json; this is not a PEFT adapter dir")
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except (SafetensorError, OSError, ValueError) as e:
        raise ExpertkitError(f"{weights}: corrupted safetensors file ({e}); retrain or restore this adapter") from None


def validate_model_dir(path: Path) -> None:
    """A full model entry (a merged model): HF config + safetensors weights (single file or shards)."""
    if not (path / "config.json").is_file():
        raise ExpertkitError(f"{path}: no config.json; this is not a Hugging Face model dir")
    shards = list(path.glob("model*.safetensors"))
    if not shards:
        if list(path.glob("pytorch_model*.bin")):
            raise ExpertkitError(f"{path}: only pickle weights; expertkit loads safetensors only")
        raise ExpertkitError(f"{path}: no model*.safetensors weights")


def validate_router_dir(path: Path) -> None:
    """A router: its parameters as JSON + safetensors (never pickle), both readable."""
    from safetensors import SafetensorError, safe_open

    missing = [f for f in ROUTER_STATE if not (path / f).is_file()]
    if missing:
        raise ExpertkitError(f"{path}: no {missing[0]}; this router is incomplete, "
                             "retrain it with `expertkit router train`")
    try:
        json.loads((path / ROUTER_STATE[0]).read_text(encoding="utf-8"))
        with safe_open(str(path / ROUTER_STATE[1]), framework="pt") as f:
            list(f.keys())
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as e:
        raise ExpertkitError(f"{path}: corrupted router state ({e}); "
                             "retrain it with `expertkit router train`") from None


def validate_mixture_dir(path: Path) -> None:
    """A mixture is only its spec (which experts, top-k); the experts themselves stay in experts/."""
    try:
        spec = json.loads((path / MIXTURE_SPEC).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExpertkitError(f"{path}: no {MIXTURE_SPEC}; recreate it with `expertkit mixture add`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExpertkitError(f"{path / MIXTURE_SPEC} is corrupted ({e}); "
                             "recreate it with `expertkit mixture add`") from None
    if not isinstance(spec, dict):
        raise ExpertkitError(f"{path / MIXTURE_SPEC}: expected a JSON object; recreate it with `expertkit mixture add`")


@dataclass(frozen=True)
class KindLayout:
    folder: str  # where entries of the kind live in the library
    validate: Callable[[Path], None]  # refuses a damaged entry dir with a message that says what to do


KINDS: dict[Kind, KindLayout] = {
    Kind.EXPERT: KindLayout("experts", validate_adapter_dir),
    Kind.MERGE: KindLayout("merges", validate_adapter_dir),
    Kind.MERGED_MODEL: KindLayout("merges", validate_model_dir),
    Kind.ROUTER: KindLayout("routers", validate_router_dir),
    Kind.MIXTURE: KindLayout("mixtures", validate_mixture_dir),
}


class Library:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------ the index

    @property
    def index_path(self) -> Path:
        return self.root / "library.json"

    def exists(self) -> bool:
        return self.index_path.is_file()

    def index(self) -> dict:
        if not self.exists():
            raise ExpertkitError(f"no expert library at {self.root} (train one with `expertkit train CONFIG`)")
        try:
            return json.loads(self.index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExpertkitError(f"{self.index_path} is corrupted ({e}); delete it to rebuild the index") from None

    def base_identity(self) -> dict:
        return self.index()["base"]

    def create_or_check(self, identity: dict) -> None:
        """Create the library for this base, or check that an existing one belongs to it."""
        ensure_writable_dir(self.root, "library folder")
        if self.exists():
            self.check_base(identity, what=f"library {self.root}")
            return
        self._write_index(identity)

    def check_base(self, identity: dict, what: str, expected: dict | None = None) -> None:
        expected = expected or self.base_identity()
        mismatch = identity_mismatch(identity, expected)
        if mismatch:
            key = mismatch[0]
            raise ExpertkitError(
                f"{what} belongs to base '{expected.get('name')}' ({key[:-5]} {expected.get(key)}), but the "
                f"loaded base is '{identity.get('name')}' ({key[:-5]} {identity.get(key)}); load the matching "
                "base or retrain the experts on this one"
            )

    def _write_index(self, identity: dict | None = None) -> None:
        identity = identity or self.base_identity()
        entries = [{"name": e.name, "kind": e.kind, "path": str(e.path.relative_to(self.root)),
                    "domain": e.domain} for e in self.entries()]
        index = {"format": LIBRARY_FORMAT, "base": identity, "entries": entries}
        atomic_write_text(self.index_path, json.dumps(index, indent=2) + "\n")

    # ------------------------------------------------------------ entries

    def entry_dir(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ExpertkitError(f"unknown library entry kind '{kind}'; allowed: {[str(k) for k in KINDS]}")
        return self.root / KINDS[Kind(kind)].folder / name

    def checkpoint_dir(self, name: str) -> Path:
        return self.root / ".checkpoints" / name

    def entries(self, kind: Kind | None = None) -> list[Entry]:
        """Every finished entry on disk (a dir with a manifest), experts first, then merges, by name; or of `kind`."""
        if kind is not None:
            return [e for e in self.entries() if e.kind == kind]
        found = []
        for sub in dict.fromkeys(layout.folder for layout in KINDS.values()):
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for d in sorted(folder.iterdir()):
                if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
                    manifest = self._read_manifest(d)
                    found.append(Entry(d.name, manifest.get("kind", Kind.EXPERT.value), d, manifest))
        return found

    def get(self, name: str) -> Entry:
        for e in self.entries():
            if e.name == name:
                return e
        known = [e.name for e in self.entries()]
        raise ExpertkitError(f"no entry named '{name}' in library {self.root}; known: {known}")

    def has(self, kind: str, name: str) -> bool:
        return (self.entry_dir(kind, name) / MANIFEST).is_file()

    def has_name(self, name: str) -> bool:
        return any(e.name == name for e in self.entries())

    @staticmethod
    def _read_manifest(d: Path) -> dict:
        try:
            return json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExpertkitError(f"{d / MANIFEST} is corrupted ({e}); delete {d} and retrain it") from None

    def add_entry(self, kind: str, name: str, write, manifest: dict, overwrite: bool = False) -> Entry:
        """Write an entry atomically: `write(tmp_dir)` writes the files, we validate them and add the manifest."""
        target = self.entry_dir(kind, name)
        clash = next((e for e in self.entries() if e.name == name and e.path != target), None)
        if clash is not None:
            raise ExpertkitError(f"the library already has a {clash.kind} named '{name}'; choose another name")
        target.parent.mkdir(parents=True, exist_ok=True)
        manifest = {"name": name, "kind": str(kind), "base": self.base_identity(), "created": time.time(), **manifest}
        with atomic_dir(target, overwrite=overwrite) as tmp:
            write(tmp)
            KINDS[Kind(kind)].validate(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        self._write_index()
        return Entry(name, kind, target, manifest)

    def copy_entry(self, source: Entry, name: str | None = None, overwrite: bool = False) -> Entry:
        """Write `source` (an entry of this library or of another on the same base) here as `name`:
        its files and its manifest, under this library's name, kind and base."""
        self.check_base(self.base_identity(), what=f"{source.kind} '{source.name}'", expected=source.manifest["base"])
        return self._write_copy(source, name or source.name, {}, overwrite)

    def port_entry(self, source: Entry, provenance: dict) -> Entry:
        """Write `source`, an entry of a library on another base, here unchanged: its files as they are, its
        manifest on this library's base with `provenance` (where it came from, how it was carried) added."""
        return self._write_copy(source, source.name, {"ported": provenance}, overwrite=False)

    def _write_copy(self, source: Entry, name: str, extra: dict, overwrite: bool) -> Entry:
        manifest = {k: v for k, v in source.manifest.items() if k not in ("name", "kind", "base", "created")}
        files = [f for f in source.path.iterdir() if f.is_file() and f.name != MANIFEST]
        return self.add_entry(source.kind, name, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in files],
                              {**manifest, **extra}, overwrite)

    def check_entry(self, entry: Entry, identity: dict) -> None:
        """An entry may only be loaded onto the base it was trained on, from safetensors."""
        if entry.kind not in KINDS:
            raise ExpertkitError(f"entry '{entry.name}' has unknown kind '{entry.kind}'; known: {[str(k) for k in KINDS]}")
        KINDS[Kind(entry.kind)].validate(entry.path)
        self.check_base(identity, what=f"{entry.kind} '{entry.name}'", expected=entry.manifest.get("base", {}))
