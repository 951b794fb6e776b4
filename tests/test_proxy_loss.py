"""Experts trained through the proxy they steer (training.proxy_for, expertkit/proxy_loss.py)."""

import json
import pickle

import pytest
import torch
import yaml
from peft import get_peft_model

from expertkit.base import load_base
from expertkit.config import PortOptions, TrainConfig, load_config
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.optim import language_model_loss
from expertkit.proxy_loss import ProxyObjective, proxy_loss_for
from expertkit.train import lora_config, train_all
from expertkit.workflow import load_project_base, validation_blocks

from conftest import write_project
from test_cli import assert_one_line_error, run_cli


def _proxy_project(root, small_project, **training):
    """The small project's base and data (expert 'alpha'), trained with `training` on top of its recipe."""
    small_cfg = load_config(small_project)
    return write_project(root, small_cfg.base.path, domains=("alpha",),
                         base={"build": small_cfg.base.build.model_dump()},
                         training={"steps": 4, **training})


def test_an_untrained_expert_gives_the_large_models_own_loss(small_project, micro_base_dir):
    """Before training the shift is zero (LoRA B = 0), so the proxy's loss is exactly the large model's."""
    cfg, small = load_project_base(small_project)
    model = get_peft_model(load_base(cfg.base.path).model, lora_config(TrainConfig(rank=4, alpha=8)))
    large = load_base(str(micro_base_dir)).model.eval()
    blocks = validation_blocks(cfg, small.tokenizer, ["alpha"], max_blocks=4)["alpha"]
    got = ProxyObjective(large, alpha=1.0)(model, blocks, torch.device("cpu"))
    torch.testing.assert_close(got, language_model_loss(large, blocks, torch.device("cpu")), rtol=1e-5, atol=1e-5)


def test_training_through_the_proxy_fits_the_proxy_and_leaves_the_large_model_alone(small_project, micro_base_dir):
    """The same steps on the same batch: the adapter trained through the proxy makes a better proxy than one
    trained on its own text, and no gradient reaches the large model."""
    cfg, small = load_project_base(small_project)
    blocks = validation_blocks(cfg, small.tokenizer, ["alpha"], max_blocks=8)["alpha"]
    large = load_base(str(micro_base_dir)).model.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    objective, cpu = ProxyObjective(large, alpha=1.0), torch.device("cpu")
    proxy_loss = {}
    for name, loss_fn in {"through": objective, "alone": language_model_loss}.items():
        torch.manual_seed(0)
        model = get_peft_model(load_base(cfg.base.path).model, lora_config(TrainConfig(rank=4, alpha=8)))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(40):
            optimizer.zero_grad()
            loss_fn(model, blocks, cpu).backward()
            optimizer.step()
        with torch.no_grad():
            proxy_loss[name] = float(objective(model, blocks, cpu))
    assert proxy_loss["through"] < proxy_loss["alone"] - 0.01, proxy_loss
    assert all(p.grad is None for p in large.parameters())
    for key, value in large.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_train_all_records_the_proxy_in_the_experts_manifest(tmp_path, small_project, micro_base_dir):
    cfg, small = load_project_base(_proxy_project(tmp_path, small_project, proxy_for=str(micro_base_dir)))
    train_all(cfg, small)
    manifest = Library(cfg.library).get("alpha").manifest
    assert manifest["recipe"]["proxy_for"] == str(micro_base_dir)
    assert manifest["loss"]["kind"].startswith("proxy"), manifest


def test_a_large_model_of_another_vocabulary_is_one_clear_error(tmp_path, monkeypatch, capsys, small_project,
                                                                two_vocabularies):
    """proxy_for must share the base's vocabulary; nothing is trained or written when it does not."""
    other_vocab = str(two_vocabularies[1].base.name)  # 320 tokens of its own; the project's base reads the micro's
    project = _proxy_project(tmp_path, small_project, proxy_for=other_vocab)
    code, _, err = run_cli(monkeypatch, capsys, "train", project)
    assert_one_line_error(code, err, "training.proxy_for", "vocabulary", "base distill")
    assert not (tmp_path / "library").exists()


@pytest.mark.parametrize("value", [None, "some/large"])
def test_a_recipe_without_proxy_for_hashes_as_before(value):
    dumped = TrainConfig(proxy_for=value).model_dump()
    assert ("proxy_for" in dumped) == (value is not None)


def test_federated_training_refuses_proxy_for_in_one_line(tmp_path, micro_base_dir, monkeypatch, capsys):
    from test_federated import federated_project

    project = federated_project(tmp_path, str(micro_base_dir))
    raw = yaml.safe_load(project.read_text())
    raw["training"]["proxy_for"] = str(micro_base_dir)
    project.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--federated", "--engine", "local")
    assert_one_line_error(code, err, "training.proxy_for", "federated")


def test_refreshing_an_expert_trained_through_a_proxy_is_refused_and_nothing_written(tmp_path, micro_base_dir):
    """port --refresh does not yet re-train through the proxy: it says so rather than refresh it another way."""
    from expertkit.porting import port_library
    from test_port import update_base

    project = write_project(tmp_path / "p", str(micro_base_dir), domains=("alpha",))
    cfg, base = load_project_base(project)
    train_all(cfg, base)
    manifest_file = Library(cfg.library).get("alpha").path / "expert.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["recipe"]["proxy_for"] = "some/large-model"
    manifest_file.write_text(json.dumps(manifest))
    out = tmp_path / "ported"
    with pytest.raises(ExpertkitError, match="trained through a proxy"):
        port_library(Library(cfg.library), load_base(str(update_base(micro_base_dir, tmp_path / "new"))), out,
                     PortOptions(refresh=2, task_examples=0), cfg)
    assert not out.exists()


def test_the_driver_shares_its_large_model_and_a_worker_loads_a_checked_copy(small_project, micro_base_dir):
    """In the driver's process the jobs reuse the large model loaded for the vocabulary check; pickled for a
    worker, the spec loads its own copy from the path and gives the same loss."""
    cfg, small = load_project_base(small_project)
    spec = proxy_loss_for(str(micro_base_dir), small)
    local = spec.build(torch.device("cpu"))
    assert local.large is spec.large.local.model
    remote = pickle.loads(pickle.dumps(spec)).build(torch.device("cpu"))
    assert remote.large is not local.large
    model = get_peft_model(load_base(cfg.base.path).model, lora_config(TrainConfig(rank=4, alpha=8)))
    blocks = validation_blocks(cfg, small.tokenizer, ["alpha"], max_blocks=4)["alpha"]
    cpu = torch.device("cpu")
    torch.testing.assert_close(remote(model, blocks, cpu), local(model, blocks, cpu))
