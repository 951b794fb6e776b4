"""Replay losses: general rows learned as text ("lm") or matched to the base ("kl")."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import MICRO_BUILD, write_project

from expertkit.data import DOMAIN_ROWS, REPLAY_ROWS, Blocks, TrainingStream
from expertkit.errors import ExpertkitError
from expertkit.optim import language_model_loss
from expertkit.replay import base_divergence, replay_loss


def blocks(n: int, start: int, length: int = 12) -> Blocks:
    ids = (torch.arange(n * length).view(n, length) * 7 + start) % 300
    return Blocks(ids, ids.clone(), torch.ones_like(ids))


def lora_model(base, seed: int = 0, init_b_nonzero: bool = True):
    """A PEFT model on a private copy of the micro base; with `init_b_nonzero`, its adapter changes the output."""
    from peft import get_peft_model

    from expertkit.config import TrainConfig
    from expertkit.train import lora_config

    model = get_peft_model(copy.deepcopy(base.model), lora_config(TrainConfig(rank=4, alpha=8)))
    if init_b_nonzero:
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return model


@pytest.fixture
def micro(micro_base_dir):
    from expertkit.base import load_base

    return load_base(str(micro_base_dir))


def test_batches_say_which_rows_are_replay():
    domain, general = blocks(5, 0), blocks(5, 100)
    stream = TrainingStream.with_replay(domain, general, 0.5, batch_size=16, seed=3)
    batch = stream.batch(7)
    assert set(batch.source.tolist()) == {DOMAIN_ROWS, REPLAY_ROWS}
    general_rows = {tuple(r) for r in general.input_ids.tolist()}
    for row, source in zip(batch.input_ids.tolist(), batch.source.tolist()):
        assert (tuple(row) in general_rows) == (source == REPLAY_ROWS)
    replay = batch.source == REPLAY_ROWS
    assert torch.equal(batch.take(replay).source, torch.full((int(replay.sum()),), REPLAY_ROWS))


def test_lm_replay_is_the_domain_loss_on_every_row(micro):
    model = lora_model(micro)
    batch = TrainingStream.with_replay(blocks(4, 0), blocks(4, 50), 0.5, 8, seed=0).batch(0)
    torch.testing.assert_close(replay_loss("lm", language_model_loss)(model, batch, "cpu"),
                               language_model_loss(model, batch, "cpu"))


def test_kl_replay_is_zero_on_general_rows_where_the_expert_is_the_base(micro):
    """A fresh adapter (B = 0) is the base: nothing to pull back, and no gradient from the general rows."""
    model = lora_model(micro, init_b_nonzero=False)
    general = blocks(3, 50)
    batch = Blocks(general.input_ids, general.labels, general.attention_mask, torch.full((3,), REPLAY_ROWS))
    loss = replay_loss("kl", language_model_loss)(model, batch, "cpu")
    assert abs(float(loss.detach())) < 1e-6
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) < 1e-6 for p in model.parameters() if p.requires_grad)


def test_kl_replay_weighs_each_part_by_its_targets(micro):
    """Domain rows keep the domain loss, general rows get KL(base || expert); the mean is over all targets."""
    model = lora_model(micro)
    domain, general = blocks(2, 0), blocks(3, 50, length=9)
    general = Blocks(torch.nn.functional.pad(general.input_ids, (0, 3)),
                     torch.nn.functional.pad(general.labels, (0, 3), value=-100),
                     torch.nn.functional.pad(general.attention_mask, (0, 3)))
    batch = Blocks.cat([domain, general])
    batch = Blocks(batch.input_ids, batch.labels, batch.attention_mask, torch.tensor([0, 0, 1, 1, 1]))
    got = replay_loss("kl", language_model_loss)(model, batch, "cpu")
    lm, kl = language_model_loss(model, domain, "cpu"), base_divergence(model, general, "cpu")
    assert float(kl.detach()) > 0.01
    n_domain, n_general = 2 * 11, 3 * 8
    torch.testing.assert_close(got, (lm * n_domain + kl * n_general) / (n_domain + n_general))


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory) -> Path:
    """A micro base trained long enough to have learned its general corpus (the shared one has not: 8 steps)."""
    from expertkit.build import build_base
    from expertkit.config import load_config

    root = tmp_path_factory.mktemp("replay")
    return build_base(load_config(write_project(root, str(root / "base"), base={"build": {**MICRO_BUILD,
                                                                                          "steps": 200}})))


def test_kl_replay_keeps_an_expert_nearer_the_base_on_general_text(tmp_path, pretrained_base):
    """Trained alike, a 'kl' expert's predictions on held-out general text stay closer to the base's than an
    'lm' expert's, and both far closer than an expert trained without replay."""
    from peft import PeftModel

    from expertkit.base import load_base
    from expertkit.data import load_corpus, make_blocks
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    divergence = {}
    for loss, replay in (("none", 0.0), ("lm", 0.5), ("kl", 0.5)):
        project = write_project(tmp_path / loss, str(pretrained_base), domains=("alpha",),
                                training={"steps": 30, "replay": replay, "learning_rate": 1e-2,
                                          "replay_loss": "lm" if loss == "none" else loss})
        cfg, base = load_project_base(project)
        (entry,) = train_all(cfg, base)
        general = make_blocks(base.tokenizer, load_corpus(cfg.general), "test", cfg.training.block_size)
        model = PeftModel.from_pretrained(load_base(str(pretrained_base)).model, str(entry.path)).eval()
        with torch.no_grad():
            divergence[loss] = float(base_divergence(model, general, "cpu"))
    assert divergence["kl"] < divergence["lm"] < 0.2 * divergence["none"], divergence


def test_an_unknown_replay_loss_is_refused_before_training(tmp_path, micro_base_dir):
    from expertkit.library import Library
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    cfg, base = load_project_base(write_project(tmp_path, str(micro_base_dir), training={"replay_loss": "mse"}))
    with pytest.raises(ExpertkitError, match="unknown replay loss 'mse'; known: kl or lm"):
        train_all(cfg, base)
    assert not Library(cfg.library).exists()


def test_the_default_replay_loss_leaves_recipes_and_their_hashes_as_they_were():
    from expertkit.config import TrainConfig
    from expertkit.train import recipe_hash

    plain, lm, kl = TrainConfig(), TrainConfig(replay_loss="lm"), TrainConfig(replay_loss="kl")
    assert "replay_loss" not in plain.model_dump() and plain.model_dump() == lm.model_dump()
    assert TrainConfig.model_validate(kl.model_dump()).replay_loss == "kl"
    assert recipe_hash(plain, "cpt", "x") == recipe_hash(lm, "cpt", "x") != recipe_hash(kl, "cpt", "x")
