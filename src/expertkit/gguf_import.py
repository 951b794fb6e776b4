"""`expertkit base import`: a GGUF file (llama.cpp's format) -> a standard Hugging Face model dir.

Many small real checkpoints are published only as GGUF. transformers reads them (config from the
metadata, tokenizer from the tokenizer.ggml.* keys, weights dequantized), but everything else in
expertkit (PEFT, vLLM, `load_base`) wants a plain safetensors dir, so we convert once. The file is
checked first (magic bytes, a readable header, an architecture transformers knows) so that a wrong
file fails in one line before the slow load, and the dir is written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from expertkit.errors import ExpertkitError
from expertkit.fsutil import atomic_dir, sha256_of
from expertkit.progress import console

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")
SOURCE_RECORD = "gguf_source.json"  # written into an imported model dir: which GGUF it came from


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    name: str | None
    tensors: int
    tensor_types: list[str]  # the storage types present, e.g. ["F32", "Q4_1", "Q8_0"]
    chat_template: str | None


def field_str(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def gguf_architectures() -> list[str]:
    """The `general.architecture` values the installed transformers can load, spelled as llama.cpp does.

    transformers keys its GGUF tables by its own model-type spelling (qwen2_moe, gpt_oss) where the
    file says qwen2moe / gpt-oss; gguf's MODEL_ARCH_NAMES tells us the file's spelling.
    """
    from gguf import MODEL_ARCH_NAMES
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # keys of the metadata table, not archs
    with contextlib.suppress(ImportError):  # transformers >= 5.x: a second loader for the newest architectures
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    in_files = set(MODEL_ARCH_NAMES.values())
    spelled = set()
    for name in names:
        candidates = [name, name.replace("_", ""), name.replace("_", "-")]
        spelled.add(next((c for c in candidates if c in in_files), name))
    return sorted(spelled)


def inspect_gguf(path: Path) -> GGUFInfo:
    """Check that `path` is a complete GGUF of an architecture transformers loads; cheap (header only)."""
    path = Path(path)
    if not path.exists():
        raise ExpertkitError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ExpertkitError(f"{path} is not a file; pass the path of a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ExpertkitError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                             "pass a llama.cpp .gguf model file")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)  # maps the file and checks every tensor's bytes are there
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        raise ExpertkitError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); download it again") from e
    architecture = field_str(reader, "general.architecture")
    if architecture is None:
        raise ExpertkitError(f"{path} has no general.architecture key; it is not a GGUF model file")
    supported = gguf_architectures()
    if architecture not in supported:
        import transformers

        raise ExpertkitError(f"{path} holds a '{architecture}' model, which transformers {transformers.__version__} "
                             f"cannot load from GGUF (it can: {', '.join(supported)})")
    return GGUFInfo(path=path, architecture=architecture, name=field_str(reader, "general.name"),
                    tensors=len(reader.tensors),
                    tensor_types=sorted({t.tensor_type.name for t in reader.tensors}),
                    chat_template=field_str(reader, "tokenizer.chat_template"))


def record_gguf_source(model_dir: Path, gguf_path: Path, architecture: str) -> None:
    """Note in an imported model dir which GGUF file it came from, so an export can serve that file."""
    gguf_path = Path(gguf_path).resolve()
    record = {"file": str(gguf_path), "sha256": sha256_of(gguf_path), "architecture": architecture}
    (Path(model_dir) / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file the base was imported from, if recorded and unchanged since; else None."""
    record_path = Path(model_dir) / SOURCE_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    path = Path(record["file"])
    if not path.is_file():
        raise ExpertkitError(f"the base was imported from {path}, which is gone; pass --base-gguf FILE "
                             "(the same GGUF) or --no-base")
    if sha256_of(path) != record["sha256"]:
        raise ExpertkitError(f"{path} changed since the base was imported from it; pass --base-gguf FILE "
                             "(the file the base came from) or --no-base")
    return path


def check_out_dir(out_dir: Path, gguf_path: Path | None, force: bool) -> bool:
    """Whether an existing `out_dir` is to be replaced; refuse what would lose data (the GGUF read from, too)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExpertkitError(f"{out_dir} exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and gguf_path is not None and gguf_path.resolve().is_relative_to(out_dir.resolve()):
        raise ExpertkitError(f"the GGUF file is inside {out_dir}, which would be replaced; "
                             "choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise ExpertkitError(f"{out_dir} already exists and is not empty; remove it or pass --force")
    return out_dir.is_dir()


def load_gguf(info: GGUFInfo, dtype: str = "float32"):
    """(model, tokenizer) from the GGUF through transformers, dequantized into plain `dtype` tensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    # transformers >= 5 can keep GGUF blocks packed; dequantize=True asks for a plain dense model (older
    # releases have no GgufConfig and always dequantize)
    with contextlib.suppress(ImportError):
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)

    with tempfile.TemporaryDirectory(prefix="expertkit-gguf-") as folder:
        # A folder holding only the file: transformers must not pick up a config.json or
        # tokenizer.json that happens to sit beside the GGUF.
        name = "model.gguf"
        os.symlink(info.path.resolve(), Path(folder) / name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                         **extra)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - anything transformers trips on here is about this file
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExpertkitError(f"transformers cannot load the '{info.architecture}' GGUF {info.path}: "
                                 f"{message}") from e
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The GGUF "quantizer" only described how to read the file; the weights are dense now. This is
        # transformers' own clean-up (drops hf_quantizer, config.quantization_config, weight conversions);
        # save_pretrained refuses the model while they are attached.
        quantizer.remove_quantization_config(model)
    if info.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = info.chat_template
    model.eval()
    return model, tokenizer


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", force: bool = False) -> Path:
    """Convert `gguf_path` into the HF model dir `out_dir` (safetensors, config, tokenizer, chat template)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ExpertkitError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    info = inspect_gguf(gguf_path)
    replace = check_out_dir(out_dir, gguf_path, force)
    size_mb = gguf_path.stat().st_size / 2**20
    console.print(f"{gguf_path.name}: {info.architecture} '{info.name or '?'}', {info.tensors} tensors "
                  f"({'/'.join(info.tensor_types)}), {size_mb:.0f} MB", highlight=False)
    started = time.time()
    console.print(f"loading and dequantizing to {dtype} with transformers ...", highlight=False)
    model, tokenizer = load_gguf(info, dtype)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"loaded {type(model).__name__}, {params / 1e6:.1f}M parameters ({time.time() - started:.0f}s)",
                  highlight=False)
    try:
        with console.status(f"writing {out_dir}"), atomic_dir(out_dir, overwrite=replace) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            record_gguf_source(tmp, gguf_path, info.architecture)  # `export gguf` serves this very file
    except OSError as e:  # disk full, permissions: atomic_dir has removed the partial copy
        raise ExpertkitError(f"cannot write {out_dir} ({e.strerror or e}); free some space or choose "
                             "another output folder") from e
    console.print(f"imported {gguf_path.name} -> {out_dir} ({time.time() - started:.0f}s)", highlight=False)
    return out_dir
