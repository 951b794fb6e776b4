import torch

from expertkit.base import load_base, model_hashes


def test_built_base_loads_with_plain_transformers(micro_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_base_dir)
    tok = AutoTokenizer.from_pretrained(micro_base_dir)
    assert model.config.model_type == "llama"
    assert (micro_base_dir / "model.safetensors").is_file()
    text = "naïve café → def f(x):\n    return x"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE: lossless on any UTF-8
    out = model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    assert out.logits.shape[-1] == len(tok)


def test_identity_is_stable_and_sensitive_to_weights(micro_base_dir):
    a, b = load_base(str(micro_base_dir)), load_base(str(micro_base_dir))
    assert a.identity() == b.identity()
    with torch.no_grad():
        b.model.model.layers[0].mlp.down_proj.weight.add_(0.01)
    assert model_hashes(b.model)["weights_hash"] != a.identity()["weights_hash"]


def test_base_load_errors_are_clear(tmp_path):
    import pytest

    from expertkit.errors import ExpertkitError

    with pytest.raises(ExpertkitError, match="base model not found"):
        load_base(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertkitError, match="not a Hugging Face model dir"):
        load_base(str(tmp_path / "empty"))


def test_a_second_base_can_reuse_the_first_ones_tokenizer(tmp_path, micro_base_dir):
    from expertkit.base import tokenizer_hash
    from expertkit.build import build_base
    from expertkit.config import load_config

    from conftest import MICRO_BUILD, write_project

    smaller = {**MICRO_BUILD, "hidden_size": 16, "intermediate_size": 32, "tokenizer": str(micro_base_dir)}
    cfg = load_config(write_project(tmp_path, str(tmp_path / "small"), base={"build": smaller}))
    small = load_base(str(build_base(cfg)))
    large = load_base(str(micro_base_dir))
    assert tokenizer_hash(small.tokenizer) == tokenizer_hash(large.tokenizer)
    assert small.model.config.hidden_size == 16
