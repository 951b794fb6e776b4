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

import torch

from expertkit.evaluate import shifted_nll
from expertkit.serve.app import create_app
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

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
