"""expertkit's lm-eval model agrees with lm-eval's own `hf` + `peft` model, request by request."""

from __future__ import annotations

import json

import pytest
from test_lm_eval import TASK_DIR, multiple_choice_docs, short_documents

from expertkit.tasks import ExpertkitLM

lm_eval = pytest.importorskip("lm_eval")


def evaluate(model, tasks: list[str], **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # lm-eval's own tasks: seconds to index
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, **kwargs)


def per_request(result: dict, task: str) -> list[float]:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for s in samples for r in s["resps"]]


@pytest.fixture
def task_files(sentence_library, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the task YAMLs read their documents from the working folder
    (tmp_path / "expertkit_mc_docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multiple_choice_docs(24)))
    lm = ExpertkitLM.from_library(sentence_library.root, "alpha", batch_size=5)
    docs = short_documents(lm.tokenizer, limit=8, max_tokens=lm.max_length - 4)
    (tmp_path / "expertkit_ppl_docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return sentence_library, lm


def test_expertkit_lm_equals_hf_with_peft(task_files):
    library, ours = task_files
    hf_args = f"pretrained={library.base_identity()['name']},peft={library.get('alpha').path},dtype=float32"
    theirs = evaluate("hf", ["expertkit_mc", "expertkit_ppl"], model_args=hf_args, device="cpu", batch_size=4)
    mine = evaluate(ours, ["expertkit_mc", "expertkit_ppl"])
    for task in ("expertkit_mc", "expertkit_ppl"):
        assert per_request(mine, task) == pytest.approx(per_request(theirs, task), abs=1e-4), task
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"]["expertkit_mc"][metric] == theirs["results"]["expertkit_mc"][metric]
    assert mine["results"]["expertkit_ppl"]["word_perplexity,none"] == pytest.approx(
        theirs["results"]["expertkit_ppl"]["word_perplexity,none"], rel=1e-5)


def test_a_router_scores_choices_it_never_read(task_files):
    """Leak-free: the router decides from the question alone, never from the choice being scored."""
    library, _ = task_files
    lm = ExpertkitLM.from_library(library.root, "base")
    read: list[list[int]] = []

    class Recording:
        decides_from_prompt, name = True, "recording"

        def prefill(self, ids, mask, keep_last=None):
            read.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
            return lm_base.prefill(ids, mask, keep_last)

        def step(self, state, next_ids):
            return lm_base.step(state, next_ids)

    lm_base, lm.composition = lm.composition, Recording()
    contexts = ["patient dose trial", "def return"]
    requests = [(None, lm.tok_encode(c), lm.tok_encode(" cohort tumor")) for c in contexts]
    stepped = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert sorted(read) == sorted(lm.tok_encode(c) for c in contexts)  # the prompts, never a choice token
    lm.composition = lm_base
    assert [s for s, _ in stepped] == pytest.approx([s for s, _ in lm._loglikelihood_tokens(requests, True)],
                                                   abs=1e-4)


@pytest.mark.parametrize("decides_from_prompt", [False, True])
def test_one_token_choices_of_one_context_share_one_forward(sentence_library, decides_from_prompt):
    """Yes/no-style choices: one forward per context serves all of its one-token continuations, with the same
    log-likelihoods as scoring each request alone; longer continuations still get a forward each."""
    lm = ExpertkitLM.from_library(sentence_library.root, "alpha", batch_size=3)
    forward_rows: list[int] = []

    class Counting:
        name = "counting"

        def __init__(self, inner):
            self.inner, self.decides_from_prompt = inner, decides_from_prompt

        def prefill(self, ids, mask, keep_last=None):
            forward_rows.append(len(ids))
            return self.inner.prefill(ids, mask, keep_last)

        def step(self, state, next_ids):
            return self.inner.step(state, next_ids)

    contexts = [lm.tok_encode(c) for c in ("patient dose trial", "def return", "the cohort")]
    requests = [(None, c, [t]) for c in contexts for t in lm.tok_encode(" abc")]
    requests += [(None, c, lm.tok_encode(" tumor")) for c in contexts]
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    lm.composition = Counting(lm.composition)
    shared = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert sum(forward_rows) == 6 and max(forward_rows) <= 3  # 3 shared + 3 own, at most batch_size at once
    assert [s for s, _ in shared] == pytest.approx([s for s, _ in alone], abs=1e-4)
    assert [g for _, g in shared] == [g for _, g in alone]


def shared_like(root, tasks: dict[str, list[dict]]):
    """A data root laid out as ../shared: tasks/<name>.jsonl."""
    (root / "tasks").mkdir(parents=True)
    for name, rows in tasks.items():
        (root / "tasks" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


SHARED_TASKS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "tasks"


def first_rows(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (SHARED_TASKS / f"{name}.jsonl").read_text().splitlines()[:n]]


def test_eval_tasks_writes_the_task_table(trained, tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    cfg, _, library = trained
    data = shared_like(tmp_path / "data", {"arc_easy": first_rows("arc_easy", 6), "piqa": first_rows("piqa", 6)})
    project = tmp_path / "project.yaml"
    args = ["eval", project, "--tasks", "arc_easy,piqa", "--tasks-data", data, "--out", tmp_path / "card"]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    card = json.loads((tmp_path / "card" / "tasks.json").read_text())
    assert {(r["composition"], r["task"]) for r in card["rows"]} == {
        (c, t) for c in ("base", "alpha", "beta") for t in ("arc_easy", "piqa")}
    assert set(card["forgetting"]) == {"alpha", "beta"} and all(r["n"] == 6 for r in card["rows"])
    assert (tmp_path / "card" / "tasks.png").stat().st_size > 0 and "general tasks" in out + err
    cached = sorted((tmp_path / "card" / "task-cache").glob("*.db"))
    assert len(cached) == 3  # one cache per composition identity: a rerun scores nothing again
    assert set(card["references"]) == {"arc_easy", "piqa"} and card["references"]["piqa"]["chance"] == 0.5
    assert "| (always the most frequent answer) |" in (tmp_path / "card" / "tasks.md").read_text()


def test_a_task_table_reads_against_guessing_and_one_constant_answer(tmp_path):
    """A labeled task whose classes are uneven: always answering its most frequent class is the score to beat,
    over the same first `limit` examples lm-eval scores."""
    from expertkit.tasks.local import reference_scores, resolve

    labels = ["no", "yes", "yes", "maybe", "yes", "no", "no", "no"]
    medical = tmp_path / "corpora" / "medical"
    medical.mkdir(parents=True)
    (medical / "eval_pubmedqa.jsonl").write_text("".join(
        json.dumps({"context": "c", "question": "q", "label": label}) + "\n" for label in labels))
    shared_like(tmp_path, {"arc_easy": [{"context": "Q", "choices": [" a", " b"], "label": 1},
                                        {"context": "Q", "choices": [" a", " b", " c", " d"], "label": 1}]})
    specs = resolve(["pubmedqa", "arc_easy"], tmp_path)
    assert reference_scores(specs, limit=5) == {
        "pubmedqa": {"chance": pytest.approx(1 / 3), "most_frequent": 0.6, "most_frequent_answer": "yes"},
        "arc_easy": {"chance": pytest.approx(0.375), "most_frequent": 1.0, "most_frequent_answer": "choice index 1"}}
    assert reference_scores(specs)["pubmedqa"] == {
        "chance": pytest.approx(1 / 3), "most_frequent": 0.5, "most_frequent_answer": "no"}
    # the heatmap's columns say the same, as the markdown's last two rows do
    from expertkit.tasks.report import column_label

    assert column_label("pubmedqa", "acc", reference_scores(specs, limit=5)["pubmedqa"]) == \
        "pubmedqa\n(acc)\nguess 33.3\nconstant 60.0"
    assert column_label("pubmedqa", "acc", None) == "pubmedqa\n(acc)"


@pytest.mark.parametrize("row, message", [
    ({"context": "Q", "choices": [" a", " b"], "label": 2}, "label 2 is out of range for 2 choices"),
    ({"context": "Q", "choices": [" a", " b"]}, "missing field(s) ['label']"),
    ({"context": "Q", "choices": [], "label": 0}, "'choices' must be a non-empty list"),
])
def test_bad_task_files_are_one_clear_error(row, message, tmp_path):
    from expertkit.errors import ExpertkitError
    from expertkit.tasks.local import resolve

    data = shared_like(tmp_path, {"arc_easy": [{"context": "Q", "choices": [" a"], "label": 0}, row]})
    with pytest.raises(ExpertkitError) as error:
        resolve(["arc_easy"], data)
    assert message in str(error.value) and "arc_easy.jsonl:2" in str(error.value)


def test_an_unknown_task_name_is_one_clear_error(sentence_library, tmp_path):
    from expertkit.errors import ExpertkitError
    from expertkit.tasks.run import evaluate_on_tasks

    lm = ExpertkitLM.from_library(sentence_library.root, "base")
    with pytest.raises(ExpertkitError, match="could not load the tasks.*no_such_task.*shipped tasks"):
        evaluate_on_tasks({"base": (lm.composition, "x")}, lm.tokenizer, lm.max_length, ["no_such_task"])


def test_tasks_are_checked_through_lm_evals_current_loader():
    """lm-eval 0.4.13 deprecates get_task_dict for TaskManager.load: the check before any model runs uses the
    latter, so it keeps working when the old function goes."""
    import warnings

    from expertkit.tasks.local import default_data_root, resolve
    from expertkit.tasks.run import check_tasks

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*get_task_dict is deprecated.*")
        check_tasks(resolve(["arc_easy", "agnews"], default_data_root()))


def test_real_tasks_match_hf_with_peft_request_for_request(sentence_library):
    """arc_easy and piqa from ../shared/tasks, 200 examples each: one request per batch on both sides (no padding
    anywhere), so every log-likelihood agrees to float32 rounding (relative: sums reach -220, where one float32
    step is 1.5e-5), and acc / acc_norm are the same."""
    from expertkit.tasks.local import default_data_root, resolve

    specs = resolve(["arc_easy", "piqa"], default_data_root())
    loaded = ExpertkitLM.from_library(sentence_library.root, "alpha")
    # the micro model's context is 64 tokens, shorter than some answers: both sides read up to 1024 positions
    ours = ExpertkitLM(loaded.composition, loaded.tokenizer, max_length=1024, batch_size=1)
    hf_args = f"pretrained={sentence_library.base_identity()['name']},peft={sentence_library.get('alpha').path}," \
              "dtype=float32,max_length=1024"
    from expertkit.tasks.run import task_manager

    run = lambda model, **kw: lm_eval.simple_evaluate(model=model, tasks=specs, limit=200, log_samples=True,  # noqa
                                                       task_manager=task_manager(specs), **kw)
    mine, theirs = run(ours), run("hf", model_args=hf_args, device="cpu", batch_size=1)
    for task in mine["results"]:
        assert len(per_request(mine, task)) >= 400
        assert per_request(mine, task) == pytest.approx(per_request(theirs, task), rel=1e-6, abs=1e-6), task
        for metric in ("acc,none", "acc_norm,none"):
            assert mine["results"][task][metric] == theirs["results"][task][metric], (task, metric)


def test_the_shipped_tasks_load_without_indexing_lm_evals_own():
    """Indexing lm-eval's thousands of task files took seconds for every composition scored; the shipped tasks are
    inline configs that need no index, and the one index is built once per process."""
    from expertkit.tasks.local import default_data_root, resolve
    from expertkit.tasks.run import task_manager

    shipped = resolve(["arc_easy", "agnews"], default_data_root())
    manager = task_manager(shipped)
    assert manager.all_tasks == [] and task_manager(shipped) is manager
    assert sorted(manager.load(shipped)["tasks"]) == ["agnews_local", "arc_easy_local"]


def test_each_task_is_judged_by_its_own_metric(sentence_library):
    """Forgetting reads the general tasks by acc_norm; a domain task (class words as choices) is read by acc, as
    lm-eval reads pubmedqa; flips compare the same metric, and acc_norm stays in every row beside it."""
    from expertkit.tasks.local import default_data_root, resolve
    from expertkit.tasks.run import evaluate_on_tasks, summarize

    lms = {name: ExpertkitLM.from_library(sentence_library.root, name) for name in ("base", "alpha")}
    specs = resolve(["arc_easy", "pubmedqa"], default_data_root())
    base = lms["base"]
    rows = evaluate_on_tasks({n: (lm.composition, n) for n, lm in lms.items()}, base.tokenizer, base.max_length,
                             specs, limit=40, batch_size=8, per_example=True)
    assert {r["task"]: r["metric"] for r in rows} == {"arc_easy": "acc_norm", "pubmedqa": "acc"}
    for row in rows:
        assert row["acc"] is not None and row["acc_norm"] is not None
        assert sum(row["correct"]) / len(row["correct"]) == pytest.approx(row[row["metric"]])
    table = {(r["composition"], r["task"]): r for r in rows}
    change = {(t, m): 100 * (table[("alpha", t)][m] - table[("base", t)][m])
              for t in ("arc_easy", "pubmedqa") for m in ("acc", "acc_norm")}
    card = summarize(rows, {"alpha": "medical"})
    assert card["forgetting"]["alpha"] == pytest.approx(change[("arc_easy", "acc_norm")])
    assert card["domain_skill"]["alpha"] == pytest.approx(change[("pubmedqa", "acc")])
    by_acc_norm = summarize(rows, {"alpha": "medical"}, metric="acc_norm")
    assert by_acc_norm["domain_skill"]["alpha"] == pytest.approx(change[("pubmedqa", "acc_norm")])


def test_a_task_that_declares_an_unknown_metric_is_one_clear_error(sentence_library):
    """Found before any model runs, not after a composition's whole pass over the tasks."""
    from expertkit.errors import ExpertkitError
    from expertkit.tasks.local import default_data_root, resolve
    from expertkit.tasks.run import evaluate_on_tasks, headline_metric

    specs = resolve(["arc_easy"], default_data_root())
    specs[0]["metadata"]["expertkit_metric"] = "f1"
    lm = ExpertkitLM.from_library(sentence_library.root, "base")
    lm.composition.prefill = None  # scoring anything would fail with another error
    with pytest.raises(ExpertkitError, match="task 'arc_easy' declares expertkit_metric 'f1'; use one of"):
        evaluate_on_tasks({"base": (lm.composition, "x")}, lm.tokenizer, lm.max_length, specs, limit=2)
    assert headline_metric(None, {"task": "lm_evals", "acc": 0.5, "acc_norm": None}) == "acc"
