"""`expertkit export gguf`: the library's adapters as llama.cpp LoRA GGUF files, checked against PEFT.

The base is a grouped-query micro Llama written as GGUF the way llama.cpp writes one (so Q and K rows
are in llama.cpp's interleaved order) and imported with `base import`; the adapters are random
(non-zero A and B), one plain and one with rsLoRA and per-module rank and alpha. Without llama.cpp the
test reads the files back and compares each module's ΔW with PEFT's merged weights; with
llama-cpp-python installed (the `llamacpp` extra) llama.cpp itself runs base + adapter and its logits
are compared with expertkit's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from gguf_writer import gqa_llama, permute_qk, write_llama_gguf

from expertkit.library import Kind, Library

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
ADAPTERS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"o_proj": 2},
               "alpha_pattern": {"v_proj": 3.0}},
}
PROMPT = "patient dose trial cohort def return self import the a of"


def _peft(base_dir: Path, settings: dict, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return get_peft_model(model, LoraConfig(target_modules=MODULES, init_lora_weights=False, **settings)).eval()


@pytest.fixture(scope="module")
def gguf_library(micro_base_dir, tmp_path_factory):
    """(library, base GGUF, base dir): a micro Llama imported from GGUF, with the adapters of ADAPTERS."""
    from transformers import AutoTokenizer

    from expertkit.base import load_base
    from expertkit.gguf_import import import_gguf

    root = tmp_path_factory.mktemp("export")
    tokenizer = AutoTokenizer.from_pretrained(micro_base_dir)
    source = write_llama_gguf(gqa_llama(tokenizer), tokenizer, root / "micro.gguf")
    base_dir = import_gguf(source, root / "base")
    library = Library(root / "library")
    library.create_or_check(load_base(str(base_dir)).identity())
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        model = _peft(base_dir, settings, seed)
        library.add_entry(Kind.EXPERT, name, lambda tmp, m=model: m.save_pretrained(tmp), {"domain": name})
    return library, source, base_dir


def _exported(monkeypatch, capsys, library: Library, out: Path) -> Path:
    code, _, err = run_cli(monkeypatch, capsys, "export", "gguf", library.root, out)
    assert code == 0, err
    return out


def peft_delta(library: Library, base_dir: Path, name: str) -> dict[str, np.ndarray]:
    """{"<layer>.<module>": ΔW} in HF row order: PEFT's merged weights minus the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, library.get(name).path).merge_and_unload().state_dict()
    return {k.removeprefix("model.layers.").removesuffix(".weight"): (merged[k] - before[k]).numpy()
            for k in before if any(f".{m}." in k for m in MODULES)}


def gguf_delta(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """({"blk.<i>.<gguf name>": alpha / rank * B @ A}, metadata) as llama.cpp computes it from the file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    deltas = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            stem = name.removesuffix(".weight.lora_a")
            b = tensors[f"{stem}.weight.lora_b"]
            deltas[stem] = fields["adapter.lora.alpha"] / a.shape[0] * (b @ a)
    return deltas, fields


def test_export_writes_llama_cpp_adapters_whose_delta_is_pefts(monkeypatch, capsys, gguf_library, tmp_path):
    library, source, base_dir = gguf_library
    out = _exported(monkeypatch, capsys, library, tmp_path / "out")
    assert (out / "base.gguf").read_bytes() == source.read_bytes()  # the file the base was imported from
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["adapters"] == {"plain": "plain.gguf", "rslora": "rslora.gguf"}
    heads, kv_heads = 4, 2
    for name in ADAPTERS:
        deltas, fields = gguf_delta(out / f"{name}.gguf")
        assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
        assert fields["general.architecture"] == "llama"
        expected = peft_delta(library, base_dir, name)
        assert len(deltas) == len(expected) == 2 * len(MODULES)
        for key, delta in expected.items():
            layer, module = key.split(".", 1)
            short = module.split(".")[-1]
            if short == "q_proj":
                delta = permute_qk(delta, heads, heads)
            elif short == "k_proj":
                delta = permute_qk(delta, heads, kv_heads)
            np.testing.assert_allclose(deltas[f"blk.{layer}.{GGUF_NAMES[short]}"], delta, rtol=1e-4, atol=1e-5)


def test_the_f32_base_type_holds_the_same_model(monkeypatch, capsys, gguf_library, tmp_path):
    """`--base-type f32` rewrites the base's GGUF dequantized; read back, it is the model the library was built on."""
    from transformers import AutoModelForCausalLM

    from expertkit.gguf_import import import_gguf

    library, _, base_dir = gguf_library
    code, _, err = run_cli(monkeypatch, capsys, "export", "gguf", library.root, tmp_path / "out", "--base-type", "f32")
    assert code == 0, err
    again = AutoModelForCausalLM.from_pretrained(import_gguf(tmp_path / "out" / "base.gguf", tmp_path / "again"))
    expected = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())


def test_llama_cpp_runs_the_exported_adapter_like_expertkit(monkeypatch, capsys, gguf_library, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                        "(pip install -e '.[llamacpp]' builds it)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    library, _, base_dir = gguf_library
    out = _exported(monkeypatch, capsys, library, tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(base_dir)(PROMPT, add_special_tokens=False)["input_ids"]
    for name in ADAPTERS:
        llm = llama_cpp.Llama(str(out / "base.gguf"), lora_path=str(out / f"{name}.gguf"), n_ctx=64,
                              n_threads=1, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # exact cache
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          library.get(name).path).eval()
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
        np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())
        llm.close()


def test_a_base_not_imported_from_gguf_exports_the_adapters_and_says_how_to_convert(monkeypatch, capsys,
                                                                                    served_library, tmp_path):
    _, library_path = served_library
    code, _, err = run_cli(monkeypatch, capsys, "export", "gguf", library_path, tmp_path / "out")
    assert code == 0, err
    assert "convert_hf_to_gguf.py" in err
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["base"] is None and not (tmp_path / "out" / "base.gguf").exists()
    assert set(manifest["adapters"]) == {e.name for e in Library(library_path).entries() if e.is_adapter}
    assert manifest["not_adapters"] == ["router-lexical"] and "router-lexical" in err


def refused(monkeypatch, capsys, fragment: str, *args) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "export", "gguf", *args)
    assert_one_line_error(code, err, fragment)


def test_bad_exports_are_one_line_and_write_nothing(monkeypatch, capsys, gguf_library, tmp_path):
    library, source, base_dir = gguf_library
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(monkeypatch, capsys, "already exists and is not empty", library.root, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    refused(monkeypatch, capsys, "not an expertkit library", tmp_path / "nothing", tmp_path / "a")
    refused(monkeypatch, capsys, "--dtype q4", library.root, tmp_path / "b", "--dtype", "q4")

    copy = Library(shutil.copytree(library.root, tmp_path / "dora-library"))
    config_path = copy.get("plain").path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    refused(monkeypatch, capsys, "DoRA", copy.root, tmp_path / "c")

    moved_base = Path(shutil.copytree(base_dir, tmp_path / "base-copy"))  # its GGUF rewritten since the import
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(source.read_bytes()[:-4] + b"\x00\x01\x02\x03")
    record = json.loads((moved_base / "gguf_source.json").read_text())
    (moved_base / "gguf_source.json").write_text(json.dumps({**record, "file": str(changed)}))
    refused(monkeypatch, capsys, "changed since", library.root, tmp_path / "d", "--base", moved_base)
    refused(monkeypatch, capsys, "not found", library.root, tmp_path / "e", "--base-gguf", tmp_path / "missing.gguf")
    assert not any((tmp_path / n).exists() for n in "abcde")
