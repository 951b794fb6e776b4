"""Corpora -> documents -> train/valid/test splits -> token blocks, and the replay-mixed training stream.

A source is a .txt file (documents between empty lines, one per line, or one running text), a
.jsonl file (a text field, or prompt/response pairs for SFT), a folder of such
files, or a Hugging Face `datasets` dataset. A folder that already holds
train/valid/test files keeps those splits; otherwise documents are split
deterministically by the hash of their text, so adding a file never reshuffles
the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertkit.config import DomainConfig, SourceConfig
from expertkit.encoding import encode_texts, special_prefix
from expertkit.errors import ExpertkitError

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}


@dataclass(frozen=True)
class Example:
    """One document (`text`), or one SFT pair (`prompt` + `response`)."""

    text: str = ""
    prompt: str | None = None
    response: str | None = None
    continues: bool = False  # a piece of a running text (a "stream" file): no end-of-text after it

    @property
    def full_text(self) -> str:
        return self.text if self.prompt is None else self.prompt + self.response


@dataclass
class Corpus:
    name: str
    splits: dict[str, list[Example]] = field(default_factory=dict)
    # how the text became documents (see SourceConfig.documents; "records" for JSON lines and datasets),
    # e.g. "stream", or "records+stream" for a folder of both kinds of file
    reading: str = "records"

    def fingerprint(self) -> str:
        """Hash of the training text, recorded in each expert's manifest."""
        h = hashlib.sha256()
        for ex in self.splits["train"]:
            h.update(ex.full_text.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- reading files


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExpertkitError(f"data file not found: {path}") from None
    except OSError as e:
        raise ExpertkitError(f"cannot read data file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExpertkitError(
            f"{path}: not UTF-8 (bad byte 0x{data[e.start]:02x} at offset {e.start}); re-encode the file as UTF-8"
        ) from None


STREAM_PIECE_LINES = 64  # a stream is split into train/valid/test in pieces of (at most) this many lines


def text_reading(text: str, mode: str) -> str:
    """The reading `auto` means for this text: documents between empty lines if it has any, else one stream."""
    if mode != "auto":
        return mode
    return "blank_line" if "\n\n" in text.replace("\r\n", "\n") else "stream"


def _documents_from_text(text: str, reading: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    if reading == "stream":  # pieces of whole lines, each ending in its newline, so that joined they are the text
        lines = [ln for ln in text.split("\n") if ln.strip()]
        size = max(1, min(STREAM_PIECE_LINES, len(lines) // 200))  # enough pieces to split a small file
        return ["\n".join(lines[i:i + size]) + "\n" for i in range(0, len(lines), size)]
    chunks = text.split("\n\n") if reading == "blank_line" else text.split("\n")
    return [c.strip() for c in chunks if c.strip()]


def _examples_from_jsonl(path: Path, text: str, source: SourceConfig, task: str) -> list[Example]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExpertkitError(f"{path}:{lineno}: invalid JSON ({e.msg}); one JSON object per line") from None
        out.append(_example_from_record(row, source, task, f"{path}:{lineno}"))
    return out


def _example_from_record(row: object, source: SourceConfig, task: str, where: str) -> Example:
    if not isinstance(row, dict):
        raise ExpertkitError(f"{where}: expected a JSON object, got {type(row).__name__}")
    wanted = [source.prompt_field, source.response_field] if task == "sft" else [source.text_field]
    missing = [k for k in wanted if not isinstance(row.get(k), str)]
    if missing:
        raise ExpertkitError(
            f"{where}: no string field {missing} (fields: {sorted(row)}); set source.text_field "
            "(or prompt_field/response_field for task: sft)"
        )
    if task == "sft":
        return Example(prompt=row[source.prompt_field], response=row[source.response_field])
    return Example(text=row[source.text_field])


def _read_file(path: Path, source: SourceConfig, task: str) -> tuple[list[Example], str]:
    """The file's examples and how they were read."""
    text = _read_utf8(path)
    fmt = source.format
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
    if fmt == "jsonl":
        return _examples_from_jsonl(path, text, source, task), "records"
    if task == "sft":
        raise ExpertkitError(f"{path}: task 'sft' needs .jsonl with prompt/response fields, got plain text")
    reading = text_reading(text, source.documents)
    return [Example(text=d, continues=reading == "stream") for d in _documents_from_text(text, reading)], reading


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES and not p.name.startswith(".")
        and not p.stem.startswith("eval_")
    )


def _given_splits(files: list[Path]) -> dict[str, list[Path]] | None:
    """Files named train/valid/test (any suffix) at the top of a folder are ready-made splits."""
    by_split: dict[str, list[Path]] = {}
    for f in files:
        split = SPLIT_ALIASES.get(f.stem.lower())
        if split:
            by_split.setdefault(split, []).append(f)
    return by_split if {"train", "test"} <= set(by_split) else None


# ---------------------------------------------------------------- splitting


def _hash_split(examples: list[Example], valid: float, test: float) -> dict[str, list[Example]]:
    ranked = sorted(examples, key=lambda ex: hashlib.sha1(ex.full_text.encode("utf-8")).hexdigest())
    n = len(ranked)
    n_test = max(1, round(n * test))
    n_valid = round(n * valid) if valid > 0 else 0
    if n - n_test - n_valid < 1:
        raise ExpertkitError(f"only {n} documents: too few to split into train/valid/test; add more text")
    return {"test": ranked[:n_test], "valid": ranked[n_test:n_test + n_valid], "train": ranked[n_test + n_valid:]}


def _load_hf(source: SourceConfig, task: str) -> dict[str, list[Example]] | list[Example]:
    import datasets

    try:
        ds = datasets.load_dataset(source.hf_dataset, source.hf_config, data_files=source.hf_data_files)
    except Exception as e:  # datasets raises many types; all mean "cannot load this dataset"
        raise ExpertkitError(f"cannot load dataset '{source.hf_dataset}': {str(e).splitlines()[0]}") from None
    converted: dict[str, list[Example]] = {}
    for split_name, rows in ds.items():
        split = SPLIT_ALIASES.get(split_name)
        if split:
            converted[split] = [
                _example_from_record(r, source, task, f"{source.hf_dataset}[{split_name}][{i}]")
                for i, r in enumerate(rows)
            ]
    if {"train", "test"} <= set(converted):
        converted.setdefault("valid", [])
        return converted
    return converted.get("train") or [ex for rows in converted.values() for ex in rows]


def load_corpus(domain: DomainConfig) -> Corpus:
    """Read a domain's source into train/valid/test examples, with clear errors for bad data.

    A domain given only as silos reads as its silos' texts together, each silo split as it would be alone.
    """
    if domain.source is None:
        parts = [load_corpus(domain.silo_domain(silo)) for silo in domain.silos]
        return Corpus(domain.name, {s: [ex for c in parts for ex in c.splits[s]] for s in SPLITS},
                      "+".join(sorted({r for c in parts for r in c.reading.split("+")})))
    source = domain.source
    readings = {"records"}
    if source.hf_dataset is not None:
        loaded = _load_hf(source, domain.task)
        splits = loaded if isinstance(loaded, dict) else None
        everything = loaded if isinstance(loaded, list) else None
    else:
        path = Path(source.path)
        if not path.exists():
            raise ExpertkitError(f"domain '{domain.name}': data path not found: {path}")
        files = _data_files(path) if path.is_dir() else [path]
        if not files:
            raise ExpertkitError(f"domain '{domain.name}': no .txt or .jsonl files in {path}")
        given = _given_splits(files) if path.is_dir() else None
        wanted = [f for paths in given.values() for f in paths] if given else files
        read = {f: _read_file(f, source, domain.task) for f in wanted}
        readings = {reading for _, reading in read.values()}
        if given:
            splits = {s: [ex for f in given.get(s, []) for ex in read[f][0]] for s in SPLITS}
            everything = None
        else:
            splits = None
            everything = [ex for f in files for ex in read[f][0]]
    if splits is None:
        if not everything:
            raise ExpertkitError(f"domain '{domain.name}': the corpus is empty (no non-blank documents)")
        if source.max_documents:
            everything = everything[: source.max_documents]
        splits = _hash_split(everything, source.split.valid, source.split.test)
    else:
        if source.max_documents:
            splits = {s: rows[: source.max_documents] for s, rows in splits.items()}
        for s in ("train", "test"):
            if not splits.get(s):
                raise ExpertkitError(f"domain '{domain.name}': the {s} split is empty; add text to it")
    return Corpus(domain.name, {s: list(splits.get(s, [])) for s in SPLITS}, "+".join(sorted(readings)))


# ---------------------------------------------------------------- tokens and blocks


@dataclass
class Blocks:
    """Fixed-length token blocks; labels are -100 where no loss is taken."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    source: torch.Tensor | None = None  # per row, which source of a TrainingStream it was drawn from

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index: torch.Tensor | slice) -> "Blocks":
        source = None if self.source is None else self.source[index]
        return Blocks(self.input_ids[index], self.labels[index], self.attention_mask[index], source)

    @staticmethod
    def cat(parts: list["Blocks"]) -> "Blocks":
        sources = [p.source for p in parts]
        return Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "labels", "attention_mask")),
                      None if any(s is None for s in sources) else torch.cat(sources))

    def scored_tokens(self) -> int:
        """How many next-token targets the blocks hold (the first position predicts nothing)."""
        return int((self.labels[:, 1:] != -100).sum())


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ExpertkitError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
    return tokenizer.eos_token_id


def pack_text(tokenizer, examples: list[Example], block_size: int) -> Blocks:
    """Concatenate documents (each followed by EOS, unless it `continues`) and cut the stream into equal blocks.

    Each block starts with the tokenizer's own prefix (BOS, for models that expect one), never scored;
    the remainder of the stream is dropped.
    """
    eos = _eos_id(tokenizer)
    prefix = special_prefix(tokenizer)
    stream: list[int] = []
    texts = [ex.full_text for ex in examples]
    for start in range(0, len(texts), 1000):
        encoded = tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"]
        for ex, ids in zip(examples[start:start + 1000], encoded):
            stream.extend(ids)
            if not ex.continues:
                stream.append(eos)
    body = block_size - len(prefix)
    n = len(stream) // body if body > 0 else 0
    if n == 0:
        raise ExpertkitError(f"only {len(stream)} tokens of text: fewer than one block of {block_size}; add text")
    ids = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), ids], dim=1)
    labels = ids.clone()
    labels[:, :len(prefix)] = -100
    return Blocks(ids, labels, torch.ones_like(ids))


def pack_sft(tokenizer, examples: list[Example], block_size: int) -> Blocks:
    """One prompt/response pair per block, loss on the response (and its EOS) only, right-padded."""
    eos = _eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = encode_texts(tokenizer, [ex.prompt for ex in examples])
    responses = tokenizer([ex.response for ex in examples], add_special_tokens=False)["input_ids"]
    n = len(examples)
    ids = torch.full((n, block_size), pad, dtype=torch.long)
    labels = torch.full((n, block_size), -100, dtype=torch.long)
    mask = torch.zeros((n, block_size), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = (p + r + [eos])[:block_size]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.tensor(seq[len(p):], dtype=torch.long)
    keep = (labels != -100).any(dim=1)
    if not keep.any():
        raise ExpertkitError(f"every prompt is longer than block_size={block_size}; raise block_size")
    return Blocks(ids[keep], labels[keep], mask[keep])


def make_blocks(tokenizer, corpus: Corpus, split: str, block_size: int, task: str = "cpt") -> Blocks:
    examples = corpus.splits.get(split) or []
    if not examples:
        raise ExpertkitError(f"domain '{corpus.name}': the {split} split is empty")
    try:
        return (pack_sft if task == "sft" else pack_text)(tokenizer, examples, block_size)
    except ExpertkitError as e:
        raise ExpertkitError(f"domain '{corpus.name}' ({split}): {e}") from None


DOMAIN_ROWS, REPLAY_ROWS = 0, 1  # the sources of TrainingStream.with_replay, as a batch's `source` gives them


class TrainingStream:
    """Deterministic batches drawn from a weighted mix of block sets.

    Batch k depends only on (seed, k): each row picks a source by its share, then a
    random block of it. A resumed run therefore sees exactly the batches an
    uninterrupted run would, with no iterator state to save. `first_batch` starts
    the stream further on: training that continues an expert (a port's refresh)
    draws the batches after the ones that expert was trained on, not them again.
    """

    def __init__(self, sources: list[tuple[Blocks, float]], batch_size: int, seed: int, first_batch: int = 0):
        sources = [(b, share) for b, share in sources if share > 0]
        if not sources:
            raise ExpertkitError("the training mix is empty: give at least one source a share > 0")
        self.sources = [b for b, _ in sources]
        self.shares = torch.tensor([share for _, share in sources], dtype=torch.float64)
        self.batch_size, self.seed, self.first_batch = batch_size, seed, first_batch

    @classmethod
    def with_replay(cls, domain: Blocks, general: Blocks | None, replay: float, batch_size: int, seed: int,
                    first_batch: int = 0):
        """Domain rows (source DOMAIN_ROWS) with a `replay` share of general rows (source REPLAY_ROWS)."""
        mix = [(domain, 1.0 - replay)] + ([(general, replay)] if general is not None and replay > 0 else [])
        return cls(mix, batch_size, seed, first_batch)

    def batch(self, step: int) -> Blocks:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first_batch + step)
        picks = torch.multinomial(self.shares, self.batch_size, replacement=True, generator=g)
        rows = []
        for source_index in picks.tolist():
            blocks = self.sources[source_index]
            row = int(torch.randint(len(blocks), (1,), generator=g))
            rows.append(blocks.take(slice(row, row + 1)))
        batch = Blocks.cat(rows)
        return Blocks(batch.input_ids, batch.labels, batch.attention_mask, picks)
