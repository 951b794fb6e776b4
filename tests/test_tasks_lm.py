"""expertkit's lm-eval model agrees with lm-eval's own `hf` + `peft` model, request by request."""

from __future__ import annotations

import json

import pytest

from expertkit.tasks import ExpertkitLM

from test_lm_eval import TASK_DIR, multiple_choice_docs, short_documents

lm_eval = pytest.importorskip("lm_eval")


def evaluate(model, tasks: list[str], **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(TASK_DIR)),
                                   log_samples=True, **kwargs)


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

        def prefill(self, ids, mask):
            read.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
            return lm_base.prefill(ids, mask)

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
