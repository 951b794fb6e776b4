"""`expertkit base distill`: a companion with the teacher's tokenizer, nearer the teacher than untrained, resumable;
cut out of the teacher by default (companion_init.py)."""

import json

import pytest
import torch

from transformers import LlamaForCausalLM

from expertkit.base import load_base
from expertkit.companion_init import calibrate, cut_config, cut_from_teacher
from expertkit.config import DistillConfig
from expertkit.base import DISTILL_FILE, companion_teacher
from expertkit.distill import DistillRun, distill, svd_embedding, topk_kl
from expertkit.errors import ExpertkitError

from conftest import write_corpus

RECIPE = {"num_layers": 1, "hidden_size": 16, "intermediate_size": 32, "steps": 30,
          "batch_size": 4, "block_size": 32, "learning_rate": 1e-2, "warmup_steps": 2, "top_k": 16,
          "checkpoint_every": 10, "eval_blocks": 8}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("distill-text"), "general", n=300)


def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher = torch.randn(2, 5, 40)
    mask = torch.ones(2, 5, dtype=torch.bool)
    # the student equal to the teacher differs only by the mass outside the top-k: KL = -log(top-k mass) >= 0
    top_mass = torch.softmax(teacher, -1).topk(40, -1).values.sum(-1)
    assert torch.allclose(topk_kl(teacher, teacher, mask, 40), -top_mass.log().mean(), atol=1e-6)
    assert float(topk_kl(torch.randn(2, 5, 40), teacher, mask, 8)) > 0.05


def test_svd_embedding_keeps_the_teachers_token_geometry():
    weight = torch.randn(50, 6) @ torch.randn(6, 12)  # rank 6
    reduced = svd_embedding(weight, 6, torch.Generator().manual_seed(0))
    assert torch.allclose(reduced @ reduced.T, weight @ weight.T, atol=1e-3)  # same inner products


def _random_llama(final_gain: bool = True):
    """A randomly initialized Llama with random norm gains (a cut must carry every gain where it belongs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_parameters={"rope_theta": 500.0, "rope_type": "default"})).eval()
    with torch.no_grad():
        for norm in [model.model.norm] + [n for layer in model.model.layers
                                           for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.uniform_(0.5, 1.5)
    return model


class _Specials:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def test_a_full_size_cut_of_the_teacher_is_the_teacher():
    teacher = _random_llama()
    ids = torch.randint(0, 100, (6, 20))
    calibration = calibrate(teacher, ids, torch.ones_like(ids))
    student = LlamaForCausalLM(cut_config(teacher, 3, 32, 64, _Specials())).eval()
    kept = cut_from_teacher(student, teacher, calibration)
    assert kept == {"teacher_layers": [0, 1, 2], "residual_share_kept": 1.0}
    assert student.config.rope_parameters["rope_theta"] == 500.0 and student.config.num_key_value_heads == 2
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-5)


def test_a_smaller_cut_keeps_the_most_used_parts_and_starts_nearer_the_teacher_than_random_layers():
    teacher = _random_llama()
    ids = torch.randint(0, 100, (6, 20))
    calibration = calibrate(teacher, ids, torch.ones_like(ids))
    calibration.influence[:] = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    student = LlamaForCausalLM(cut_config(teacher, 2, 16, 32, _Specials())).eval()
    kept = cut_from_teacher(student, teacher, calibration)
    assert kept["teacher_layers"] == [0, 2]  # the two that turn the stream most, in order
    dims = torch.argsort(calibration.input_energy[[0, 2, 3]].sum(0), descending=True)[:16].sort().values
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight[:, dims])
    random_layers = LlamaForCausalLM(cut_config(teacher, 2, 16, 32, _Specials())).eval()

    def kl_to_teacher(model):
        with torch.no_grad():
            target = teacher(ids).logits.log_softmax(-1)
            return float(torch.nn.functional.kl_div(model(ids).logits.log_softmax(-1), target, log_target=True,
                                                    reduction="batchmean"))

    assert kl_to_teacher(student) < 0.6 * kl_to_teacher(random_layers)


def test_a_teacher_that_cannot_be_cut_gets_the_embedding_init_said_once(tmp_path, micro_base_dir, text, capsys):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "qwen")
    AutoTokenizer.from_pretrained(micro_base_dir).save_pretrained(tmp_path / "qwen")
    run = DistillRun(load_base(str(tmp_path / "qwen")), text, tmp_path / "c", DistillConfig(**RECIPE))
    first, second = run.student(), run.student()
    err = capsys.readouterr().err
    assert err.count("cannot be cut, its architecture is 'qwen2'") == 1
    assert first.config.num_attention_heads == 1 and run.init_report == {}  # student_config's heads: 16 / 64 -> 1
    assert torch.equal(first.get_input_embeddings().weight, second.get_input_embeddings().weight)


def test_distill_writes_a_companion_closer_to_the_teacher(tmp_path, micro_base_dir, text):
    out = tmp_path / "companion"
    report = distill(str(micro_base_dir), text, out, DistillConfig(**RECIPE))
    companion, teacher = load_base(str(out)), load_base(str(micro_base_dir))
    assert companion.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    assert companion.model.config.vocab_size == teacher.model.config.vocab_size
    assert report["companion_params"] < report["teacher_params"]
    assert companion_teacher(out) == teacher.identity()
    saved = json.loads((out / DISTILL_FILE).read_text())
    assert saved["report"]["companion_ppl"] == report["companion_ppl"]
    assert report["init"] == "teacher" and report["teacher_layers"] in ([0], [1])
    # training moved the companion toward the teacher: its perplexity is far below the untrained student's
    run = DistillRun(teacher, text, tmp_path / "other", DistillConfig(**RECIPE))
    from expertkit.base import perplexity
    from expertkit.train import mean_loss

    untrained = perplexity(mean_loss(run.student(), run.test, teacher.device, 4))
    assert report["companion_ppl"] < 0.8 * untrained
    assert not (tmp_path / "companion.checkpoints").exists()
    with pytest.raises(ExpertkitError, match="already holds a model"):
        distill(str(micro_base_dir), text, out, DistillConfig(**RECIPE))


def test_a_killed_distillation_resumes_to_the_same_companion(tmp_path, micro_base_dir, text, monkeypatch):
    from expertkit import distill as module

    whole = tmp_path / "whole"
    distill(str(micro_base_dir), text, whole, DistillConfig(**RECIPE))
    calls = {"n": 0}
    real_step = module.train_step

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", dying_step)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        distill(str(micro_base_dir), text, resumed, DistillConfig(**RECIPE))
    assert (tmp_path / "resumed.checkpoints" / "state.pt").is_file() and not resumed.exists()
    monkeypatch.setattr(module, "train_step", real_step)
    report = distill(str(micro_base_dir), text, resumed, DistillConfig(**RECIPE))
    assert report["resumed_from_step"] == 10
    a, b = load_base(str(whole)).model.state_dict(), load_base(str(resumed)).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bad_inputs_are_one_clear_line(tmp_path, micro_base_dir, text):
    with pytest.raises(ExpertkitError, match="--text .* not found"):
        distill(str(micro_base_dir), tmp_path / "nothing.txt", tmp_path / "c")
    with pytest.raises(ExpertkitError, match="base model not found"):
        distill(str(tmp_path / "no-teacher"), text, tmp_path / "c")
    with pytest.raises(ExpertkitError, match="teacher's own folder"):
        distill(str(micro_base_dir), text, micro_base_dir, force=True)


def test_cli_distills_and_refuses_bad_options(monkeypatch, capsys, tmp_path, micro_base_dir, text):
    from test_cli import assert_one_line_error, run_cli

    args = ("base", "distill", "--teacher", micro_base_dir, "--text", text, "--layers", "1", "--hidden", "16",
            "--intermediate", "32", "--steps", "3", "--batch-size", "2", "--block-size", "32")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "c")
    assert code == 0, err
    assert "companion:" in err and "perplexity on the text's test split" in err
    teacher = load_base(str(micro_base_dir)).identity()
    assert companion_teacher(tmp_path / "c")["weights_hash"] == teacher["weights_hash"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--init", "embedding", "--heads", "2", "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / DISTILL_FILE).read_text())["report"]["init"] == "embedding"
    early = args[:-6]  # without --steps, --batch-size, --block-size
    code, _, err = run_cli(monkeypatch, capsys, *early, "--init", "embedding", "--hidden", "18", "--heads", "4",
                           "--out", tmp_path / "d")
    assert_one_line_error(code, err, "hidden_size=18 must be divisible by num_heads=4")
    code, _, err = run_cli(monkeypatch, capsys, *early, "--heads", "2", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "num_heads is the teacher's with init 'teacher'")
    code, _, err = run_cli(monkeypatch, capsys, *early, "--hidden", "17", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "not a multiple of the teacher's 2 attention heads", "try 16 or 18")
    code, _, err = run_cli(monkeypatch, capsys, *early, "--layers", "3", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "--layers 3 > the teacher's 2")
    assert not (tmp_path / "d").exists()
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "c")
    assert_one_line_error(code, err, "already holds a model")
