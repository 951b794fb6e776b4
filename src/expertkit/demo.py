"""`expertkit demo`: the whole path offline in a few minutes on 2 CPU cores.

It writes the demo's corpora and a project YAML into the work dir (so the same
run can be repeated with the ordinary commands), builds a tiny base, trains
three experts, prints the scorecard, a verdict per domain and a continuation of
one prompt per domain from the base and from its expert.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from expertkit.progress import console

DEMO_DOMAINS = ("code", "docs", "licenses")


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


def _prompt_for(corpus, tokenizer, n_tokens: int = 16) -> str:
    text = corpus.splits["test"][0].full_text
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens])


def run_demo(workdir: Path, device: str | None = None) -> dict:
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
    config_path = workdir / "project.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(data), sort_keys=False), encoding="utf-8")
    console.rule("1. base model")
    cfg, base = load_project_base(config_path, device)
    console.rule("2. one LoRA expert per domain")
    train_all(cfg, base)
    console.rule("3. scorecard")
    card = run_scorecard(cfg, base)
    console.rule("4. continuations (greedy)")
    pool = ExpertPool(base, Library(cfg.library))
    compositions = {c.name: c for c in build_compositions(pool)}
    params = SamplingParams(max_new_tokens=24)
    for name in DEMO_DOMAINS:
        prompt = _prompt_for(load_corpus(cfg.domain(name)), base.tokenizer)
        console.print(f"[bold]{name}[/bold] prompt: {prompt!r}", highlight=False)
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
