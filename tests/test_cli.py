"""The CLI end to end, in process: exit codes, one-line errors, files written."""

from types import SimpleNamespace

import pytest
import torch
from conftest import assert_one_line_error, read_json, run_cli, write_project

from expertkit.runtime import SamplingParams, decoding, generate
from expertkit.runtime.tokens import left_pad


def capture_generations(monkeypatch) -> list:
    """Record each call of the generation loop from now on: its composition, prompts, params and texts."""
    calls = []

    def recording(composition, tokenizer, prompts, params=SamplingParams(), context_length=None):
        texts = generate(composition, tokenizer, prompts, params, context_length=context_length)
        calls.append(SimpleNamespace(composition=composition, prompts=list(prompts), params=params, texts=texts))
        return texts

    monkeypatch.setattr(decoding, "generate", recording)
    return calls


def assert_cli_generated(out, calls, prompt, reference, tokenizer, max_new_tokens):
    """`generate` printed the prompt and exactly the greedy continuation of `reference`, a composition
    built here with the options the command was given, and it generated with that very composition."""
    expected = generate(reference, tokenizer, [prompt], SamplingParams(max_new_tokens=max_new_tokens))[0]
    assert expected, "the reference continuation is empty: nothing to compare"
    assert out == prompt + expected + "\n"
    assert len(calls) == 1 and calls[0].prompts == [prompt] and calls[0].texts == [expected]
    ids, mask = left_pad(tokenizer, ["patient dose trial", "the a of"])
    torch.testing.assert_close(calls[0].composition.prefill(ids, mask)[0], reference.prefill(ids, mask)[0],
                               msg=lambda m: f"the command generated with another composition than it was asked: {m}")


def test_train_eval_list_generate(monkeypatch, capsys, project, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", project)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", project, "--out", tmp_path / "report")
    assert code == 0, err
    card = read_json(tmp_path / "report" / "scorecard.json")
    assert set(card["ppl"]) == {"base", "alpha", "beta"}
    assert set(card["ppl"]["alpha"]) == {"general", "alpha", "beta"}
    assert (tmp_path / "report" / "scorecard.png").stat().st_size > 1000
    assert "| composition |" in (tmp_path / "report" / "scorecard.md").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "library", "list", tmp_path / "library")
    assert code == 0 and "alpha" in err and "beta" in err
    calls = capture_generations(monkeypatch)
    code, out, err = run_cli(monkeypatch, capsys, "generate", project, "patient dose", "--model", "alpha",
                             "--max-tokens", "5")
    assert code == 0, err
    from expertkit.compose import build_compositions
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool
    from expertkit.workflow import load_project_base

    cfg, base = load_project_base(project)
    pool = ExpertPool(base, Library(cfg.library))
    alpha, plain = build_compositions(pool, ["alpha", "base"])
    ids, mask = left_pad(base.tokenizer, ["patient dose trial"])
    assert not torch.allclose(alpha.prefill(ids, mask)[0], plain.prefill(ids, mask)[0])  # --model matters
    assert_cli_generated(out, calls, "patient dose", alpha, base.tokenizer, max_new_tokens=5)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.write_text("base: [unclosed\n"), "invalid YAML at line"),
    (lambda p: p.write_text(p.read_text() + "epochs: 3\n"), "unknown key 'epochs'"),
    (lambda p: (p.parent / "data" / "alpha.txt").unlink(), "data path not found"),
    (lambda p: (p.parent / "data" / "alpha.txt").write_text("\n\n"), "corpus is empty"),
    (lambda p: (p.parent / "data" / "alpha.txt").write_bytes(b"ok\n\xc3\x28\n"), "not UTF-8"),
])
def test_bad_inputs_exit_1_with_one_line(monkeypatch, capsys, project, mutate, message):
    mutate(project)
    code, _, err = run_cli(monkeypatch, capsys, "train", project)
    assert_one_line_error(code, err, message)
    assert not (project.parent / "library" / "experts").exists()


def test_missing_config_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found")


def test_eval_with_a_library_of_another_base(monkeypatch, capsys, trained, tmp_path):
    cfg, _, _ = trained
    import shutil

    import torch

    from expertkit.base import load_base

    other = tmp_path / "other"
    shutil.copytree(cfg.base.path, other)
    b = load_base(str(other))
    with torch.no_grad():
        b.model.model.embed_tokens.weight.mul_(2)
    b.model.save_pretrained(other)
    project = write_project(tmp_path / "p2", str(other), library=cfg.library)
    code, _, err = run_cli(monkeypatch, capsys, "eval", project)
    assert_one_line_error(code, err, "belongs to base")


def test_corrupted_adapter_via_cli(monkeypatch, capsys, trained, project):
    cfg, _, library = trained
    (library.get("alpha").path / "adapter_model.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(monkeypatch, capsys, "eval", project)
    assert_one_line_error(code, err, "corrupted safetensors")
