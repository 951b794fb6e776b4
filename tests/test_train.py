import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

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


def test_sft_expert_trains_on_prompt_response_pairs(tmp_path, micro_base_dir):
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
    (entry,) = train_all(cfg, base)
    assert entry.manifest["task"] == "sft" and entry.manifest["metrics"]["valid_ppl"] > 1
