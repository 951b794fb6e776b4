"""`expertkit export gguf`: a library's adapters as llama.cpp LoRA files, and its base as GGUF.

llama.cpp loads LoRA adapters from GGUF (`llama-server -m base.gguf --lora medical.gguf`). We write
what its own converter (convert_lora_to_gguf.py) writes: `general.type = adapter`, `adapter.type =
lora`, `adapter.lora.alpha`, and for every adapted weight `<gguf name>.lora_a` / `.lora_b` with PEFT's
shapes. Tensor names come from the `gguf` package's TensorNameMap (llama.cpp's own table). The one
architecture-specific step is the row order of Q and K on Llama-family bases: llama.cpp's converter
interleaves each head's rotary halves, so the B factor's rows must follow (a registry below says which
architectures do that). The base is the GGUF it was imported from (`expertkit base import` records it):
llama.cpp then runs exactly the weights the experts were trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertkit.errors import ExpertkitError
from expertkit.fsutil import atomic_dir
from expertkit.gguf_import import check_out_dir, field_str, inspect_gguf, source_gguf
from expertkit.library import Library
from expertkit.progress import console
from expertkit.registry import Registry

PEFT_PREFIX = "base_model.model."
DTYPES = {"f32": np.float32, "f16": np.float16}


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # general.architecture as llama.cpp spells it
    interleaved_qk: bool  # llama.cpp's converter permutes Q/K rows (its LlamaModel.undo_permute)


GGUF_ARCHITECTURES: Registry[GGUFArchitecture] = Registry("architecture for GGUF export")
for _model_type in ("llama", "mistral"):
    GGUF_ARCHITECTURES.add(_model_type, GGUFArchitecture("llama", interleaved_qk=True))
for _model_type, _name in (("gemma3_text", "gemma3"), ("gemma3", "gemma3"), ("gemma2", "gemma2"),
                           ("qwen2", "qwen2"), ("qwen3", "qwen3")):
    GGUF_ARCHITECTURES.add(_model_type, GGUFArchitecture(_name, interleaved_qk=False))


# ---------------------------------------------------------------- the base's GGUF

def _check_base_gguf(path: Path, architecture: GGUFArchitecture) -> None:
    info = inspect_gguf(path)
    if info.architecture != architecture.name:
        raise ExpertkitError(f"{path} holds a '{info.architecture}' model but the library's base is "
                             f"'{architecture.name}'; pass the GGUF of the library's base")


# ---------------------------------------------------------------- one adapter

def _interleave_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's two rotary halves become interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scale of one module's B @ A (alpha / r, or alpha / sqrt(r) with rsLoRA; per-module patterns)."""
    alpha = float(next((v for k, v in (config.get("alpha_pattern") or {}).items() if module.endswith(k)),
                       config["lora_alpha"]))
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _refuse_unsupported(config: dict, where: Path) -> None:
    unsupported = {"use_dora": "DoRA", "modules_to_save": "modules_to_save",
                   "trainable_token_indices": "trainable tokens"}
    for key, what in unsupported.items():
        if config.get(key):
            raise ExpertkitError(f"{where} uses {what}, which llama.cpp's LoRA format cannot hold")
    if config.get("peft_type", "LORA") != "LORA" or config.get("lora_bias") or config.get("bias", "none") != "none":
        raise ExpertkitError(f"{where} is not a plain LoRA adapter; llama.cpp loads only LoRA A/B pairs")


def adapter_tensors(adapter_dir: Path, architecture: GGUFArchitecture, model_config: dict,
                    dtype=np.float32) -> tuple[dict[str, np.ndarray], float]:
    """({gguf tensor name: array}, alpha) for a PEFT adapter dir, in llama.cpp's names and row order.

    llama.cpp scales each pair by alpha / rank; where PEFT's own scale differs (rsLoRA, per-module
    alpha), the difference is folded into B so the product is PEFT's exactly.
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    _refuse_unsupported(config, adapter_dir)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    n_blocks = model_config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture.name),
                                     n_blocks)
    n_head = model_config["num_attention_heads"]
    n_kv_head = model_config.get("num_key_value_heads") or n_head
    alpha = float(config["lora_alpha"])
    out: dict[str, np.ndarray] = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key[:-len(".lora_A.weight")].removeprefix(PEFT_PREFIX)
        a, b = weights[key].astype(np.float32), weights[key.replace(".lora_A.", ".lora_B.")].astype(np.float32)
        target = names.get_name(module)
        if target is None:
            raise ExpertkitError(f"{adapter_dir} adapts '{module}', which has no llama.cpp tensor for "
                                 f"'{architecture.name}'")
        rank = a.shape[0]
        b = b * (_scaling(config, module, rank) / (alpha / rank))  # 1.0 for a plain LoRA: nothing changes
        if architecture.interleaved_qk and module.endswith("q_proj"):
            b = _interleave_rows(b, n_head)
        elif architecture.interleaved_qk and module.endswith("k_proj"):
            b = _interleave_rows(b, n_kv_head)
        out[f"{target}.weight.lora_a"] = np.ascontiguousarray(a.astype(dtype))
        out[f"{target}.weight.lora_b"] = np.ascontiguousarray(b.astype(dtype))
    if not out:
        raise ExpertkitError(f"{adapter_dir} holds no LoRA weights")
    return out, alpha


def write_adapter_gguf(path: Path, name: str, architecture: GGUFArchitecture, tensors: dict[str, np.ndarray],
                       alpha: float) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    _finish(writer)


def _finish(writer) -> None:
    """Write a filled GGUFWriter's header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- the library

@dataclass
class GGUFExport:
    out_dir: Path
    base: Path | None  # None: the base was not exported (say why in `base_note`)
    adapters: dict[str, Path]
    base_note: str


def base_architecture(model_dir: Path) -> tuple[GGUFArchitecture, dict]:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ExpertkitError(f"the library's base {model_dir} is not a local model dir with a config.json; "
                             "pass --base DIR (the base the library was trained on)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")
    if model_type not in GGUF_ARCHITECTURES:
        raise ExpertkitError(f"exporting '{model_type}' models to GGUF is not supported (supported: "
                             f"{GGUF_ARCHITECTURES.listing()})")
    return GGUF_ARCHITECTURES[model_type], config.get("text_config", config)


def _place_base(src: Path, dst: Path) -> None:
    """A hard link when the file system allows (no copy of a large file), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _dequantized_base(src: Path, dst: Path) -> None:
    """`src` with every tensor dequantized to F32 and the same metadata: exactly the weights expertkit runs.

    llama.cpp multiplies quantized weights with activations quantized to 8 bits, so on a quantized base its
    greedy tokens can differ from expertkit's where two candidates are close; on this copy they do not.
    """
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), field_str(reader, "general.architecture"))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        if key == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    _finish(writer)


BASE_TYPES = {"source": _place_base, "f32": _dequantized_base}  # --base-type: how base.gguf is made


def export_gguf(library_path: Path, out_dir: Path, base: Path | None = None, base_gguf: Path | None = None,
                with_base: bool = True, dtype: str = "f32", base_type: str = "source",
                force: bool = False) -> GGUFExport:
    """Write every adapter entry of the library (experts and adapter merges) as `<name>.gguf` in `out_dir`,
    and the base as `base.gguf` (the GGUF it came from, or with `base_type="f32"` that file dequantized);
    `export.json` lists them with the llama.cpp command that serves them."""
    library, out_dir = Library(library_path), Path(out_dir)
    if not library.exists():
        raise ExpertkitError(f"{library.root} is not an expertkit library (no index); train experts first")
    if dtype not in DTYPES:
        raise ExpertkitError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if base_type not in BASE_TYPES:
        raise ExpertkitError(f"--base-type {base_type} is not one of {', '.join(BASE_TYPES)}")
    entries = library.entries()
    adapters = [e for e in entries if e.is_adapter]
    skipped = [e.name for e in entries if not e.is_adapter]  # full models, routers, mixtures
    if not adapters:
        raise ExpertkitError(f"library {library.root} has no adapters to export; train experts first")
    model_dir = Path(base or library.base_identity()["name"])
    architecture, model_config = base_architecture(model_dir)
    base_file, base_note = None, "not exported (--no-base)"
    if with_base:
        base_file = Path(base_gguf) if base_gguf else source_gguf(model_dir)
        if base_file is None:
            base_note = (f"not exported: {model_dir} was not imported from a GGUF; convert it with llama.cpp's "
                         f"convert_hf_to_gguf.py {model_dir} --outfile {out_dir}/base.gguf, or pass --base-gguf")
        else:
            _check_base_gguf(base_file, architecture)
            base_note = f"{base_file}" + (" dequantized to F32" if base_type == "f32" else "")
    replace = check_out_dir(out_dir, base_file, force)

    written: dict[str, Path] = {}
    with atomic_dir(out_dir, overwrite=replace) as tmp:
        for entry in adapters:
            console.print(f"  {entry.name} ({entry.kind}) -> {entry.name}.gguf", highlight=False)
            tensors, alpha = adapter_tensors(entry.path, architecture, model_config, DTYPES[dtype])
            write_adapter_gguf(tmp / f"{entry.name}.gguf", entry.name, architecture, tensors, alpha)
            written[entry.name] = out_dir / f"{entry.name}.gguf"
        if base_file is not None:
            with console.status(f"writing base.gguf ({base_type})"):
                BASE_TYPES[base_type](base_file, tmp / "base.gguf")
        manifest = {"architecture": architecture.name, "base": "base.gguf" if base_file else None,
                    "base_source": base_note, "adapters": {n: p.name for n, p in written.items()},
                    "dtype": dtype, "base_type": base_type, "not_adapters": skipped,
                    "llama_cpp": f"llama-server -m base.gguf --lora {next(iter(written.values())).name}"}
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if skipped:
        console.print(f"not exported (no llama.cpp adapter form): {', '.join(skipped)}", highlight=False)
    return GGUFExport(out_dir, out_dir / "base.gguf" if base_file else None, written, base_note)

