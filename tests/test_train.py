import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.train import train_all
from expertkit.workflow import load_project_base

from conftest import read_json, write_project


def test_experts_are_standard_peft_adapters(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, base, library = trained
    names = [e.name for e in library.entries()]
    assert names == ["alpha", "beta"]
    entry = library.get("alpha")
    manifest = read_json(entry.path / "expert.json")
    assert manifest["domain"] == "alpha" and manifest["steps"] == 6
    assert manifest["base"]["weights_hash"] == base.identity()["weights_hash"]
    assert len(manifest["data_fingerprint"]) == 16
    plain = AutoModelForCausalLM.from_pretrained(cfg.base.path)
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = plain(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(plain, str(entry.path))
    assert not torch.allclose(peft_model(input_ids=ids).logits, base_logits)
    assert read_json(library.index_path)["entries"][0]["name"] == "alpha"
    assert not library.checkpoint_dir("alpha").exists()  # checkpoints are cleaned after success


def test_finished_experts_are_not_retrained(trained):
    cfg, base, library = trained
    before = (library.get("alpha").path / "adapter_model.safetensors").stat().st_mtime_ns
    assert train_all(cfg, base) == []
    assert (library.get("alpha").path / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_training_is_deterministic_and_leaves_the_base_clean(project, tmp_path, micro_base_dir):
    cfg, base = load_project_base(project)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    train_all(cfg, base, only=["alpha"])
    after = base.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    other = write_project(tmp_path / "again", str(micro_base_dir))
    cfg2, base2 = load_project_base(other)
    train_all(cfg2, base2, only=["alpha"])
    a = load_file(str(Library(cfg.library).get("alpha").path / "adapter_model.safetensors"))
    b = load_file(str(Library(cfg2.library).get("alpha").path / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_strength_keeps_that_share_of_the_trained_update(project, tmp_path, micro_base_dir):
    """training.strength scales the finished update (WiSE-FT's interpolation), not the training: the same run,
    its B factors scaled and its A factors as they were; a recipe at the default dumps as before the option."""
    cfg, base = load_project_base(project)
    train_all(cfg, base, only=["alpha"])
    weaker = write_project(tmp_path / "weaker", str(micro_base_dir), training={"strength": 0.25})
    cfg2, base2 = load_project_base(weaker)
    train_all(cfg2, base2, only=["alpha"])
    full = load_file(str(Library(cfg.library).get("alpha").path / "adapter_model.safetensors"))
    scaled = load_file(str(Library(cfg2.library).get("alpha").path / "adapter_model.safetensors"))
    assert {k for k in full if "lora_B" in k} and full.keys() == scaled.keys()
    for key in full:
        torch.testing.assert_close(scaled[key], full[key] * (0.25 if "lora_B" in key else 1.0))
    assert Library(cfg2.library).get("alpha").manifest["recipe"]["strength"] == 0.25
    assert "strength" not in cfg.training.model_dump()  # so a default recipe's hash (and cache) is unchanged


def test_training_on_from_a_weakened_expert_trains_its_full_update(tmp_path, micro_base_dir):
    """A port refresh continues an expert saved at strength s: training resumes from its full update and the
    strength is applied once at the end, so a refresh that barely moves the weights returns the expert as it was
    (not s times weaker again)."""
    import dataclasses

    from expertkit.train import TrainState, expert_job, train_expert_job

    project = write_project(tmp_path, str(micro_base_dir), training={"strength": 0.5, "replay": 0})
    cfg, base = load_project_base(project)
    library = Library(cfg.library)
    (entry,) = train_all(cfg, base, only=["alpha"])
    recipe = cfg.training.model_copy(update={"learning_rate": 1e-12, "steps": 1, "warmup_steps": 0})
    job = dataclasses.replace(expert_job(cfg.domain("alpha"), base.tokenizer, recipe, library),
                              start_from=str(entry.path), checkpoints=str(tmp_path / "refresh"))
    staged = train_expert_job(job, TrainState(base, None), lambda *_, **__: None)["staged"]
    before = load_file(str(entry.path / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "refresh" / "final" / "adapter_model.safetensors"))
    assert staged == str(tmp_path / "refresh" / "final") and before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key])


def _train_cmd(project):
    return [sys.executable, "-m", "expertkit.cli", "train", str(project), "--only", "alpha"]


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path, micro_base_dir):
    long = {"steps": 400, "checkpoint_every": 20}
    killed = write_project(tmp_path / "killed", str(micro_base_dir), training=long)
    clean = write_project(tmp_path / "clean", str(micro_base_dir), training=long)
    ckpts = tmp_path / "killed" / "library" / ".checkpoints" / "alpha"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/meta.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "library" / "experts" / "alpha").exists()
    resumed = subprocess.run(_train_cmd(killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming expert 'alpha' from step" in resumed.stderr
    subprocess.run(_train_cmd(clean), env=env, check=True, capture_output=True)
    a = load_file(str(tmp_path / "killed" / "library" / "experts" / "alpha" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "clean" / "library" / "experts" / "alpha" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_unknown_only_domain(project):
    cfg, base = load_project_base(project)
    with pytest.raises(Exception, match=r"--only names unknown domains \['gamma'\]"):
        train_all(cfg, base, only=["gamma"])


def _response_only_loss(logits, input_ids, attention_mask, response_start: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the tokens a response-only SFT loss counts, and how many.

    `response_start` maps each SFT row (its real tokens: prompt + response + EOS) to where its response
    starts; only the response and its EOS are scored there. Any other row is a replay block of plain
    text, scored on every token after the first.
    """
    total, count = torch.zeros(()), 0
    for row in range(input_ids.shape[0]):
        seq = tuple(input_ids[row][attention_mask[row].bool()].tolist())
        first = response_start.get(seq, 1)
        targets = torch.tensor(seq[first:])
        nll = torch.nn.functional.cross_entropy(logits[row, first - 1:len(seq) - 1].float(), targets, reduction="sum")
        total, count = total + nll, count + len(targets)
    return total, count


def test_sft_expert_trains_on_prompt_response_pairs(tmp_path, micro_base_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import expertkit.train
    from expertkit.data import load_corpus

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"question": f"patient {i} dose?", "answer": f" trial {i} mg."}) + "\n"
                             for i in range(60)))
    project = write_project(tmp_path, str(micro_base_dir), domains=("alpha",))
    raw_domain = {"name": "qa", "task": "sft",
                  "source": {"path": str(pairs), "prompt_field": "question", "response_field": "answer"}}
    raw = yaml.safe_load(project.read_text())
    raw["domains"] = [raw_domain]
    project.write_text(yaml.safe_dump(raw))
    cfg, base = load_project_base(project)
    tok, block = base.tokenizer, cfg.training.block_size

    def tokens(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def sft_rows(examples):  # our own tokenization: each pair's real tokens -> where its response starts
        rows = {}
        for ex in examples:
            prompt = tokens(ex.prompt)
            assert len(prompt) < block
            rows[tuple((prompt + tokens(ex.response) + [tok.eos_token_id])[:block])] = len(prompt)
        return rows

    # Every training step's loss must be the response-only loss of its batch, computed here independently.
    corpus = load_corpus(cfg.domains[0])
    response_start = sft_rows(corpus.splits["train"])
    real_step, seen = expertkit.train.train_step, []

    def checked_step(model, batch, optimizer, scheduler, max_grad_norm, device, loss_fn):
        with torch.no_grad():  # the batch comes from the CPU, the model runs on `device`
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        nll, count = _response_only_loss(logits.cpu(), batch.input_ids, batch.attention_mask, response_start)
        loss = real_step(model, batch, optimizer, scheduler, max_grad_norm, device, loss_fn)
        sft = sum(tuple(r[m.bool()].tolist()) in response_start for r, m in zip(batch.input_ids, batch.attention_mask))
        seen.append((loss, float(nll / count), sft))
        return loss

    monkeypatch.setattr(expertkit.train, "train_step", checked_step)
    (entry,) = train_all(cfg, base)
    assert entry.manifest["task"] == "sft" and entry.manifest["metrics"]["valid_ppl"] > 1
    assert len(seen) == cfg.training.steps and sum(sft for *_, sft in seen) > 0
    for step, (loss, expected, _) in enumerate(seen):
        assert loss == pytest.approx(expected, rel=1e-5), f"step {step}: the loss is not the response-only loss"

    # The recorded validation perplexity is the response-only one too (validation: the first 32 pairs).
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base.path), str(entry.path)).eval()
    valid = list(sft_rows(corpus.splits["valid"][:32]).items())
    assert valid
    nll, count = torch.zeros(()), 0
    with torch.no_grad():
        for seq, start in valid:
            logits = model(input_ids=torch.tensor([seq])).logits
            row_nll, row_count = _response_only_loss(logits, torch.tensor([seq]), torch.ones(1, len(seq)),
                                                     {seq: start})
            nll, count = nll + row_nll, count + row_count
    assert entry.manifest["metrics"]["valid_ppl"] == pytest.approx(math.exp(float(nll / count)), rel=1e-4)


def test_training_refuses_a_base_with_library_adapters_attached(trained):
    from expertkit.runtime import ExpertPool

    cfg, base, library = trained
    assert not base.has_adapters
    ExpertPool(base, library)
    assert base.has_adapters
    with pytest.raises(ExpertkitError, match="already has library adapters attached"):
        train_all(cfg, base, force=True)
