"""lm-evaluation-harness (`lm_eval --model local-completions`) against `expertkit serve` agrees with expertkit.

The task scores whole short documents (each fits one window, after lm-eval's end-of-text prefix);
expertkit scores the same token rows with its own scorecard NLL, and the word perplexities must
agree within 1%.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertkit.evaluate import shifted_nll
from expertkit.serve.app import create_app
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

from conftest import synthetic_documents
from test_serve import KEY

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
TASK_DIR = Path(__file__).parent / "lm_eval"


def short_documents(tokenizer, limit: int, max_tokens: int) -> list[str]:
    lines = (CORPORA / "literature" / "test.txt").read_text(encoding="utf-8").splitlines()
    docs = [line for line in lines if len(tokenizer(line, add_special_tokens=False)["input_ids"]) <= max_tokens]
    assert len(docs) >= limit, f"only {len(docs)} short lines in {CORPORA}/literature/test.txt"
    return docs[:limit]


def expertkit_word_perplexity(composition, tokenizer, docs: list[str]) -> float:
    total_nll, words = 0.0, 0
    for doc in docs:
        ids = [tokenizer.eos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        logits, _ = composition.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        nll, _ = shifted_nll(logits, torch.tensor([ids]))
        total_nll += nll
        words += len(re.split(r"\s+", doc))
    return math.exp(total_nll / words)


def test_lm_eval_perplexity_matches_expertkit(served_library, micro_base_dir, tmp_path):
    _, library = served_library
    service = build_local_service(library, ServeOptions(max_batch=8))
    tokenizer, context = service.tokenizer, service.context_length
    docs = short_documents(tokenizer, limit=12, max_tokens=context - 4)
    (tmp_path / "expertkit_ppl_docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    expected = expertkit_word_perplexity(service.engine.compositions["alpha"], tokenizer, docs)
    with BackgroundServer(create_app(service, api_key=KEY)) as server:
        model_args = (f"model=alpha,base_url={server.url}/v1/completions,tokenizer={micro_base_dir},"
                      f"tokenizer_backend=huggingface,max_length={context},max_retries=1,num_concurrent=1")
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                              model_args, "--tasks", "expertkit_ppl", "--include_path", str(TASK_DIR),
                              "--output_path", str(tmp_path / "out")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    reported = json.loads(results_file.read_text())["results"]["expertkit_ppl"]["word_perplexity,none"]
    print(f"lm-eval word perplexity {reported:.4f}; expertkit {expected:.4f}; "
          f"relative difference {abs(reported - expected) / expected:.2e}")
    assert abs(reported - expected) / expected < 0.01, (reported, expected)


def multiple_choice_docs(n: int) -> list[dict]:
    """Sentence starts with 4 candidate endings (one right); every ending closes its sentence with '.'."""
    docs = [d.rstrip(".").split() for d in synthetic_documents("alpha", n + 3, seed=21)]
    rows = []
    for i in range(n):
        endings = [" " + " ".join(docs[i + k][-5:]) + "." for k in range(4)]
        label = i % 4
        endings[0], endings[label] = endings[label], endings[0]
        rows.append({"context": " ".join(docs[i][:6]), "choices": endings, "label": label})
    return rows


def lm_eval_samples(model: str, model_args: str, workdir: Path, env: dict) -> tuple[dict, list[float]]:
    """lm-eval's metrics for expertkit_mc and every (document, choice) log-likelihood."""
    out = workdir / f"out-{model}"
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                          "--tasks", "expertkit_mc", "--include_path", str(TASK_DIR), "--device", "cpu",
                          "--log_samples", "--output_path", str(out)],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_expertkit_mc_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    return (json.loads(results_file.read_text())["results"]["expertkit_mc"],
            [float(r[0][0]) for s in samples for r in s["resps"]])


def test_lm_eval_through_the_server_equals_hf_with_peft(sentence_library, tmp_path):
    """The same expert, scored by lm-eval through `expertkit serve` and by lm-eval's own hf + peft model.

    The expert ends sentences with end-of-text, so greedy answers often stop at once: the path where the
    served echo once lost its last entry and lm-eval summed the wrong tokens.
    """
    rows = multiple_choice_docs(24)
    (tmp_path / "expertkit_mc_docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base_dir = sentence_library.base_identity()["name"]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    hf_metrics, hf_ll = lm_eval_samples("hf", f"pretrained={base_dir},peft={sentence_library.get('alpha').path},"
                                               "dtype=float32", tmp_path, env)
    service = build_local_service(sentence_library.root, ServeOptions(max_batch=8))
    with BackgroundServer(create_app(service, api_key=KEY)) as server:
        served_metrics, served_ll = lm_eval_samples(
            "local-completions", f"model=alpha,base_url={server.url}/v1/completions,tokenizer={base_dir},"
                                 "tokenizer_backend=huggingface,max_retries=1,num_concurrent=1", tmp_path, env)
    service.engine.stop()
    print(f"lm-eval through the server: {served_metrics}; hf + peft: {hf_metrics}")
    assert served_ll == pytest.approx(hf_ll, abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert served_metrics[metric] == hf_metrics[metric], metric
