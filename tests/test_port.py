"""`expertkit port`: carrying a library to an updated base, refreshing it, and the refusals.

The "updated base" is the micro base trained a few more steps on general text, which changes every
weight and keeps the architecture and tokenizer: what a base update is.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, read_json, run_cli, write_project

from expertkit.config import PortOptions
from expertkit.errors import ExpertkitError
from expertkit.fsutil import sha256_of
from expertkit.library import ADAPTER_WEIGHTS, Kind, Library
from expertkit.porting.report import CARRY, REFRESH, RETRAIN, flips, recovery, verdict


def update_base(source, out, steps: int = 4, seed: int = 1):
    """`source` trained `steps` more steps on its general corpus: same shapes and tokenizer, new weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertkit.build import pretrain
    from expertkit.data import Blocks, TrainingStream

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = torch.randint(5, len(tokenizer), (16, 32))
    blocks = Blocks(ids, ids.clone(), torch.ones_like(ids))
    pretrain(model, TrainingStream([(blocks, 1.0)], 4, seed), steps, 1e-2, 0, torch.device("cpu"), "updating")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ported_setup(tmp_path_factory, micro_base_dir):
    """(project YAML, library, updated base dir): experts alpha and beta, a linear merge, a mixture, a router."""
    from expertkit.compose.mix import add_mixture
    from expertkit.config import MixtureConfig
    from expertkit.merging import make_recipe, merge_experts
    from expertkit.runtime import ExpertPool
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base, run_router_train

    root = tmp_path_factory.mktemp("port")
    project = write_project(root, str(micro_base_dir))
    cfg, base = load_project_base(project)
    train_all(cfg, base)
    library = Library(cfg.library)
    run_router_train(cfg, base, "lexical", "router-lexical")
    merge_experts(ExpertPool(base, library), library,
                  make_recipe(method="linear", experts=["alpha", "beta"], weights=[0.5, 0.5]), "m-linear")
    add_mixture(library, "mix", MixtureConfig(experts=["alpha", "beta"]))
    return project, library, update_base(micro_base_dir, root / "updated")


def test_training_free_port_keeps_adapters_and_remakes_what_depends_on_the_base(ported_setup, tmp_path, monkeypatch,
                                                                                 capsys):
    project, old, updated = ported_setup
    out = tmp_path / "new-library"
    code, stdout, err = run_cli(monkeypatch, capsys, "port", str(project), "--to", str(updated), "--out", str(out),
                                "--task-examples", "0")
    assert code == 0, err
    new = Library(out)
    assert new.base_identity()["weights_hash"] != old.base_identity()["weights_hash"]
    for name in ("alpha", "beta"):
        entry = new.get(name)
        assert sha256_of(entry.path / ADAPTER_WEIGHTS) == sha256_of(old.get(name).path / ADAPTER_WEIGHTS)
        assert entry.manifest["base"] == new.base_identity()
        assert entry.manifest["ported"]["from_base"] == old.base_identity()
    assert new.get("mix").kind == Kind.MIXTURE
    merge = new.get("m-linear")
    assert merge.manifest["parameters"] == old.get("m-linear").manifest["parameters"]
    router = new.get("router-lexical")
    assert router.manifest["ported"]["method"] == "retrained on the new base"
    report = read_json(out / "port_report.json")
    for row in report["experts"].values():
        assert row["ported_ppl"] > 0 and row["new_base_ppl"] > 0 and row["old_ppl"] > 0
        assert row["verdict"] == CARRY or row["verdict"].startswith(REFRESH)
    assert (out / "port_report.md").is_file()


def test_ported_expert_on_the_new_base_is_peft_with_the_old_adapter(ported_setup, tmp_path):
    """The ported entry gives exactly what PEFT gives with the old adapter dir on the new base."""
    from peft import PeftModel

    from expertkit.base import load_base
    from expertkit.compose import build_compositions
    from expertkit.porting import port_library
    from expertkit.runtime import ExpertPool

    _, old, updated = ported_setup
    out = tmp_path / "new"
    port_library(old, load_base(str(updated)), out, PortOptions())
    ids = torch.tensor([[5, 17, 42, 9, 33, 61]])
    (ported,) = build_compositions(ExpertPool(load_base(str(updated)), Library(out), names=["alpha"]), ["alpha"])
    logits, _ = ported.prefill(ids, torch.ones_like(ids))
    reference = PeftModel.from_pretrained(load_base(str(updated)).model, str(old.get("alpha").path))
    assert torch.allclose(logits, reference(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("compatible", [False, True])
def test_refresh_continues_from_the_ported_weights(ported_setup, tmp_path, compatible, monkeypatch):
    from expertkit.base import load_base
    from expertkit.config import load_config
    from expertkit.data import TrainingStream
    from expertkit.porting import port_library
    from expertkit.porting.port import batches_read

    streams = []  # where each refresh's data stream starts
    with_replay = TrainingStream.with_replay
    monkeypatch.setattr(TrainingStream, "with_replay", classmethod(
        lambda cls, *args: streams.append(args[-1]) or with_replay(*args)))
    project, old, updated = ported_setup
    out = tmp_path / "refreshed"
    options = PortOptions(refresh=3, compatible=compatible, task_examples=0)
    report = port_library(old, load_base(str(updated)), out, options, load_config(project))
    entry = Library(out).get("alpha")
    assert entry.manifest["steps"] == 3
    trained = old.get("alpha").manifest["steps"]
    # each expert's refresh (alpha's, then beta's) reads the batches after its own training; a later refresh
    # of this one would start after its 3 steps (batches_read)
    assert streams == [trained, old.get("beta").manifest["steps"]]
    assert entry.manifest["first_batch"] == trained and batches_read(entry) == trained + 3
    assert entry.manifest["continued_from_sha256"] == sha256_of(old.get("alpha").path / ADAPTER_WEIGHTS)
    assert ("loss" in entry.manifest) == compatible
    assert sha256_of(entry.path / ADAPTER_WEIGHTS) != sha256_of(old.get("alpha").path / ADAPTER_WEIGHTS)
    assert all(row["refreshed_ppl"] > 0 for row in report["experts"].values())


def test_a_shared_memo_measures_what_two_ports_have_in_common_once(ported_setup, tmp_path, monkeypatch):
    """The port suite ports one library twice (plain and compatible refresh): the old and ported experts and the
    bases are measured by the first call only, and the second's report has the very same figures for them."""
    from expertkit.base import load_base
    from expertkit.config import load_config
    from expertkit.porting import port_library
    from expertkit.porting import report as port_report

    project, old, updated = ported_setup
    cfg, memo = load_config(project), {}
    first = port_library(old, load_base(str(updated)), tmp_path / "plain", PortOptions(refresh=2, task_examples=0),
                         cfg, measured=memo)
    scored, text_scores = [], port_report.text_scores
    monkeypatch.setattr(port_report, "text_scores", lambda c, *a: scored.append(c.name) or text_scores(c, *a))
    second = port_library(old, load_base(str(updated)), tmp_path / "compatible",
                          PortOptions(refresh=2, compatible=True, task_examples=0), cfg, measured=memo)
    assert sorted(scored) == sorted(first["experts"])  # each refreshed expert, nothing else
    for name, row in second["experts"].items():
        for key in ("old_base_ppl", "old_ppl", "new_base_ppl", "ported_ppl"):
            assert row[key] == first["experts"][name][key], key
        assert row["refreshed_ppl"] != first["experts"][name]["refreshed_ppl"]


def test_compatible_loss_is_the_lm_loss_plus_kl_on_the_old_experts_right_tokens(micro_base_dir):
    from transformers import AutoModelForCausalLM

    from expertkit.data import Blocks
    from expertkit.optim import language_model_loss
    from expertkit.porting.compatible_loss import CompatibleObjective

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(micro_base_dir)
    teacher = AutoModelForCausalLM.from_pretrained(micro_base_dir)
    ids = torch.randint(5, 300, (2, 12))
    same = Blocks(ids, ids.clone(), torch.ones_like(ids))
    assert torch.allclose(CompatibleObjective(teacher, 1.0)(student, same, "cpu"),
                          language_model_loss(student, same, "cpu"), atol=1e-6)  # the same model: KL 0
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        old = teacher(input_ids=ids).logits[:, :-1]
        new = student(input_ids=ids).logits[:, :-1]
    labels = ids.clone()
    labels[:, 1::2] = old.argmax(-1)[:, 0::2]  # the old model is right on every other target
    batch = Blocks(ids, labels, torch.ones_like(ids))
    right = old.argmax(-1) == labels[:, 1:]
    assert 0 < int(right.sum()) < right.numel()
    expected = (torch.softmax(old[right], -1) * (torch.log_softmax(old[right], -1)
                                                 - torch.log_softmax(new[right], -1))).sum(-1).mean()
    got = CompatibleObjective(teacher, 2.0)(student, batch, "cpu") - language_model_loss(student, batch, "cpu")
    assert float(expected) > 0
    assert torch.allclose(got, 2.0 * expected, atol=1e-5)


def test_flips_recovery_and_verdicts():
    assert flips([1, 1, 0, 0], [1, 0, 1, 0]) == (0.25, 0.25)
    assert recovery(20.0, 15.0, 10.0) == 0.5
    options = PortOptions()
    kept = {"ported_recovery": 0.95, "old_acc": 0.5, "ported_acc": 0.5}
    assert verdict(kept, options) == CARRY
    assert verdict({**kept, "ported_acc": 0.45}, options).startswith(REFRESH)  # 5 points below the old expert
    lost = {**kept, "ported_recovery": 0.4, "refreshed_recovery": 0.97, "refreshed_acc": 0.5}
    assert verdict(lost, options) == REFRESH
    assert verdict({**lost, "refreshed_recovery": 0.5}, options) == RETRAIN
    # accuracy is judged against the retrained expert when there is one: retraining would not do better here
    assert verdict({**lost, "refreshed_acc": 0.45, "retrained_acc": 0.45}, options) == REFRESH


def _other_base(root, micro_base_dir, **changes):
    """A base like the micro one with config `changes` (random weights), the micro tokenizer unless replaced."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(micro_base_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(micro_base_dir).save_pretrained(root)
    return root


def _qwen2(root, micro_base_dir):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(root)
    AutoTokenizer.from_pretrained(micro_base_dir).save_pretrained(root)
    return root


def _retokenized(root, micro_base_dir):
    from transformers import AutoTokenizer

    _other_base(root, micro_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(micro_base_dir)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    first, second = sorted(vocab, key=vocab.get)[10:12]
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model_vocab = data["model"]["vocab"]
    model_vocab[first], model_vocab[second] = model_vocab[second], model_vocab[first]
    (root / "tokenizer.json").write_text(json.dumps(data))
    return root


BAD_BASES = {
    "architecture": (_qwen2, ["'qwen2'", "'llama'"]),
    "tokenizer": (_retokenized, ["another tokenizer", "is id"]),
    "shapes": (lambda root, micro: _other_base(root, micro, intermediate_size=48), ["mlp", "48", "64"]),
}


@pytest.mark.parametrize("problem", sorted(BAD_BASES))
def test_a_base_the_experts_cannot_be_carried_to_is_refused_and_nothing_written(problem, ported_setup, tmp_path,
                                                                                  micro_base_dir, monkeypatch, capsys):
    make, fragments = BAD_BASES[problem]
    project, _, _ = ported_setup
    bad = make(tmp_path / "bad", micro_base_dir)
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "port", str(project), "--to", str(bad), "--out", str(out))
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_same_base_existing_out_and_bad_options_are_refused(ported_setup, micro_base_dir, tmp_path, monkeypatch,
                                                            capsys):
    project, _, updated = ported_setup
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "port", str(project), "--to", str(micro_base_dir), "--out", str(out))
    assert_one_line_error(code, err, "already on")
    assert not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "port", str(project), "--to", str(updated), "--out", str(taken))
    assert_one_line_error(code, err, "already exists")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    code, _, err = run_cli(monkeypatch, capsys, "port", str(project), "--to", str(updated), "--out", str(out),
                           "--compatible")
    assert_one_line_error(code, err, "--refresh")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "port", str(tmp_path / "empty"), "--to", str(updated), "--out",
                           str(out))
    assert_one_line_error(code, err, "no expert library")
    assert not out.exists()


def test_library_folder_ports_training_free_and_refuses_refresh(ported_setup, tmp_path, monkeypatch, capsys):
    _, old, updated = ported_setup
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "port", str(old.root), "--to", str(updated), "--out", str(out),
                           "--refresh", "2")
    assert_one_line_error(code, err, "project YAML")
    assert not out.exists()
    code, stdout, err = run_cli(monkeypatch, capsys, "port", str(old.root), "--to", str(updated), "--out", str(out))
    assert code == 0, err
    assert "not carried" in stdout + err  # the router needs the project's data to be retrained
    assert not Library(out).has_name("router-lexical") and Library(out).has_name("alpha")


def test_port_options_are_validated():
    with pytest.raises(ValueError):
        PortOptions(compatible=True)
    from expertkit.config import port_options

    with pytest.raises(ExpertkitError, match="--refresh"):
        port_options(compatible=True)


def test_report_counts_flips_on_the_domains_labeled_task(micro_base_dir, tmp_path):
    """A domain named 'medical' is measured on PubMedQA (../shared): accuracies and flips per stage, consistent.
    The compatible refresh keeps the old expert's answers on the 100 validation questions."""
    import yaml
    from conftest import project_dict

    from expertkit.base import load_base
    from expertkit.config import load_config
    from expertkit.porting import port_library
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    raw = project_dict(tmp_path, str(micro_base_dir), domains=("alpha",))
    raw["domains"][0]["name"] = "medical"
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump(raw))
    cfg, base = load_project_base(project)
    train_all(cfg, base)
    updated = update_base(micro_base_dir, tmp_path / "updated")
    report = port_library(Library(cfg.library), load_base(str(updated)), tmp_path / "out",
                          PortOptions(refresh=2, compatible=True, task_examples=6), load_config(project))
    row = report["experts"]["medical"]
    assert row["task"] == "pubmedqa"
    answers = Library(tmp_path / "out").get("medical").manifest["loss"]["answers"]
    assert answers["task"] == "pubmedqa" and answers["questions"] == 100
    for stage in ("ported", "refreshed"):
        change = row[f"{stage}_acc"] - row["old_acc"]
        assert change == pytest.approx(row[f"{stage}_positive_flips"] - row[f"{stage}_negative_flips"])
        assert 0 <= row[f"{stage}_negative_flips"] <= row["old_acc"]
        assert 0 <= row[f"{stage}_token_negative_flips"] < 1  # token by token on the test text


NEWS_ROWS = [("valid", "Rain in Paris", "The city flooded.", "World"),
             ("valid", "Cup final won", "The team scored twice.", "Sports"),
             ("valid", "Shares fall", "Markets closed lower.", "Business"),
             ("valid", "New chip", "A faster processor ships.", "Sci/Tech"),
             ("valid", "Talks resume", "Leaders met on Monday.", "World"),
             ("test", "Bank merger", "Two lenders join.", "Business"),
             ("test", "Match drawn", "No goals were scored.", "Sports"),
             ("test", "Probe lands", "The craft reached Mars.", "Sci/Tech")]


def _labeled_news(root, with_split: bool = True):
    """A data root laid out as ../shared with a small AG News file (five validation rows, three test rows)."""
    folder = root / "corpora" / "news"
    folder.mkdir(parents=True)
    rows = [{**({"split": split} if with_split else {}), "title": title, "description": text, "label": label}
            for split, title, text, label in NEWS_ROWS]
    (folder / "eval_agnews_topic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_the_answer_term_reads_validation_questions_as_the_evaluation_scores_them(ported_setup, tmp_path):
    """Its examples are the validation rows only, and the old expert's choice scores on them are the very
    log-likelihoods lm-eval's evaluation reads: its per-question right/wrong is the evaluation's."""
    from expertkit.porting.compatible_loss import load_old_expert
    from expertkit.porting.task_term import choice_log_probs, validation_choices
    from expertkit.tasks import ExpertkitLM
    from expertkit.tasks.local import resolve
    from expertkit.tasks.run import evaluate_on_tasks

    _, old, _ = ported_setup
    root = _labeled_news(tmp_path / "data")
    identity = old.base_identity()
    teacher = load_old_expert(identity["name"], identity, str(old.get("alpha").path), "cpu")
    lm = ExpertkitLM.from_library(old.root, "alpha")
    task, examples = validation_choices("news", lm.tokenizer, lm.max_length, root)
    assert task == "agnews" and len(examples) == 5
    assert [e.gold for e in examples] == [0, 1, 2, 3, 0]
    scores = [choice_log_probs(teacher, e, "cpu") for e in examples]
    assert any(len(choice) > 1 for e in examples for choice in e.choices)  # "Sci/Tech": the cached path too
    for example, score in zip(examples, scores):
        expected = [lm._loglikelihood_tokens([(None, list(example.context), list(c))], disable_tqdm=True)[0][0]
                    for c in example.choices]
        assert score.tolist() == pytest.approx(expected, abs=1e-4)
    (row,) = evaluate_on_tasks({"alpha": (lm.composition, "")}, lm.tokenizer, lm.max_length,
                               resolve(["agnews"], root, split="valid"), per_example=True)
    assert row["correct"] == [int(int(s.argmax()) == e.gold) for s, e in zip(scores, examples)]
    (measured,) = evaluate_on_tasks({"alpha": (lm.composition, "")}, lm.tokenizer, lm.max_length,
                                    resolve(["agnews"], root, split="test"), per_example=True)
    assert len(measured["correct"]) == 3  # the report's flips: the test rows, which the term never reads
    unsplit = _labeled_news(tmp_path / "unsplit", with_split=False)
    assert validation_choices("news", lm.tokenizer, lm.max_length, unsplit) == ("agnews", [])


def test_the_answer_term_is_kl_on_the_questions_the_old_expert_got_right(ported_setup, tmp_path):
    from expertkit.porting.compatible_loss import load_old_expert
    from expertkit.porting.task_term import ChoiceDistillation, ChoiceExample, choice_log_probs

    _, old, _ = ported_setup
    identity = old.base_identity()
    teacher = load_old_expert(identity["name"], identity, str(old.get("alpha").path), "cpu")
    student = load_old_expert(identity["name"], identity, str(old.get("alpha").path), "cpu")
    questions = [ChoiceExample((5, 17, 42, 9), ((33,), (61, 7), (12,)), gold) for gold in range(3)]
    questions += [ChoiceExample((8, 21, 30), ((44, 45, 46), (50,)), gold) for gold in range(2)]
    same = ChoiceDistillation(teacher, questions, "cpu", per_step=2, seed=0)
    right = [q for q in questions if int(choice_log_probs(teacher, q, "cpu").argmax()) == q.gold]
    assert [q for q, _ in same.kept] == right and len(right) == 2  # one right answer per context
    assert float(same(student, "cpu")) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.requires_grad_(True)
    moved = ChoiceDistillation(teacher, questions, "cpu", per_step=2, seed=0)
    term = moved(student, "cpu")
    (q0, old0), (q1, old1) = [moved.kept[i] for i in moved.order]
    with torch.no_grad():
        expected = sum(float((old.exp() * (old - choice_log_probs(student, q, "cpu").log_softmax(-1))).sum())
                       for q, old in ((q0, old0), (q1, old1))) / 2
    assert float(term.detach()) > 0 and float(term.detach()) == pytest.approx(expected, rel=1e-4)
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert ChoiceDistillation(teacher, [q for q in questions if q not in right], "cpu", 2, 0)(student, "cpu") is None


@pytest.mark.parametrize("flag, answers", [([], True), (["--tokens-only"], False)])
def test_cli_compatible_keeps_answers_unless_told_tokens_only(flag, answers, tmp_path, monkeypatch, capsys):
    import expertkit.workflow

    seen = []
    monkeypatch.setattr(expertkit.workflow, "run_port", lambda source, to, out, options, *rest: seen.append(options))
    code, _, err = run_cli(monkeypatch, capsys, "port", str(tmp_path / "p.yaml"), "--to", "b", "--out",
                           str(tmp_path / "o"), "--refresh", "4", "--compatible", *flag)
    assert code == 0, err
    assert seen[0].compatible and seen[0].compatible_task is answers


def test_a_resumed_compatible_refresh_reads_the_questions_it_would_have(micro_base_dir, tmp_path):
    """The answer term's place in its question order is checkpointed: killed after a checkpoint and resumed, the
    refresh ends with the very weights of an uninterrupted one (without it, the resumed run reads other ones)."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from expertkit.config import TrainConfig
    from expertkit.data import Blocks, TrainingStream
    from expertkit.porting.compatible_loss import CompatibleObjective
    from expertkit.porting.task_term import ChoiceDistillation, ChoiceExample
    from expertkit.train import _run_steps, lora_config

    recipe = TrainConfig(steps=4, checkpoint_every=2, warmup_steps=0, batch_size=2, learning_rate=5e-2, dropout=0.0)
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (8, 12))
    stream = TrainingStream([(Blocks(ids, ids.clone(), torch.ones_like(ids)), 1.0)], 2, seed=0)
    teacher = AutoModelForCausalLM.from_pretrained(micro_base_dir)
    questions = [ChoiceExample(tuple(torch.randint(5, 300, (6,)).tolist()), ((33,), (61, 7)), gold)
                 for _ in range(6) for gold in range(2)]

    def train(folder, stop_after=None):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base_dir), lora_config(recipe))
        objective = CompatibleObjective(teacher, 3.0, ChoiceDistillation(teacher, questions, "cpu", 1, seed=0))
        done = []

        def advance(n=None, info=None):
            if info is not None:
                done.append(info)
                if stop_after is not None and len(done) > stop_after:
                    raise KeyboardInterrupt  # killed after step 3, its checkpoint at step 2

        _run_steps(model, stream, recipe, "alpha", folder, "hash", "cpu", advance, objective, objective)
        model.save_pretrained(folder / "final")
        return load_file(str(folder / "final" / "adapter_model.safetensors")), objective.answers.position

    whole, read = train(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", stop_after=2)
    resumed, read_resumed = train(tmp_path / "resumed")
    assert read_resumed == read == 4
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key])
