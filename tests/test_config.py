import pytest
import yaml

from expertkit.config import config_from_dict, load_config
from expertkit.errors import ExpertkitError

from conftest import project_dict


def test_defaults_live_in_the_models(tmp_path):
    cfg = config_from_dict(project_dict(tmp_path, "base"))
    assert cfg.training.schedule == "cosine"
    assert cfg.evaluation.max_blocks == 4


def test_unknown_key_is_named(tmp_path):
    raw = project_dict(tmp_path, "base", training={"stepz": 3})
    with pytest.raises(ExpertkitError, match=r"unknown key 'training.stepz'"):
        config_from_dict(raw)


def test_bad_literal_lists_allowed_values(tmp_path):
    raw = project_dict(tmp_path, "base", training={"schedule": "sawtooth"})
    with pytest.raises(ExpertkitError, match=r"training.schedule.*'cosine', 'linear' or 'constant'"):
        config_from_dict(raw)


def test_an_infinite_number_is_named(tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text(yaml.safe_dump(project_dict(tmp_path, "base", training={"learning_rate": float("inf")})))
    assert "learning_rate: .inf" in path.read_text()
    with pytest.raises(ExpertkitError, match=r"training.learning_rate.*finite number"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  path: x\n domains: [\n")
    with pytest.raises(ExpertkitError, match=r"invalid YAML at line \d+"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ExpertkitError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_replay_needs_a_general_corpus(tmp_path):
    raw = project_dict(tmp_path, "base")
    del raw["general"]
    raw["base"]["build"]["corpus"] = {"alpha": 1.0}
    with pytest.raises(ExpertkitError, match="replay > 0 needs a 'general' corpus"):
        config_from_dict(raw)


def test_duplicate_domain_names(tmp_path):
    raw = project_dict(tmp_path, "base")
    raw["domains"][1]["name"] = "alpha"
    with pytest.raises(ExpertkitError, match="repeated: alpha"):
        config_from_dict(raw)


def test_relative_paths_resolve_against_the_config(tmp_path):
    raw = project_dict(tmp_path, "base")
    raw["library"] = "lib"
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.library == str(tmp_path / "sub" / "lib")
    assert cfg.base.path == str(tmp_path / "sub" / "base")


def test_context_tokens_must_leave_something_to_score(tmp_path):
    with pytest.raises(ExpertkitError, match=r"context_tokens \(32\) must be smaller than block_size \(32\)"):
        config_from_dict(project_dict(tmp_path, "base", evaluation={"block_size": 32, "context_tokens": 32}))


def test_spread_scores_blocks_from_the_whole_test_split(tmp_path, micro_base_dir):
    """`sample: spread` takes max_blocks evenly spaced blocks, first and last included; `first` the first ones."""
    import torch
    from transformers import AutoTokenizer

    from expertkit.evaluate import test_blocks

    tokenizer = AutoTokenizer.from_pretrained(micro_base_dir)
    every = test_blocks(config_from_dict(project_dict(tmp_path, "base", evaluation={"max_blocks": None})), tokenizer)
    picked = {sample: test_blocks(config_from_dict(project_dict(tmp_path, "base", evaluation={"sample": sample})),
                                  tokenizer) for sample in ("first", "spread")}
    for domain, blocks in every.items():
        count = len(blocks)
        assert count > 8  # enough blocks for the two samples to differ
        spaced = torch.linspace(0, count - 1, 4).round().long()
        assert torch.equal(picked["spread"][domain].input_ids, blocks.input_ids[spaced])
        assert torch.equal(picked["first"][domain].input_ids, blocks.input_ids[:4])
    with pytest.raises(ExpertkitError, match="sample"):
        config_from_dict(project_dict(tmp_path, "base", evaluation={"sample": "random"}))
