"""The scorecard: perplexity of every composition on every domain's test split.

Written only against the Composition interface (prefill -> logits), so a new
strategy adds a row, never a code path.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from expertkit.config import ProjectConfig
from expertkit.data import Blocks, load_corpus, make_blocks
from expertkit.fsutil import atomic_write_text, ensure_writable_dir
from expertkit.runtime import Composition
from expertkit.scoring import continuation_log_probs

READINGS = {"stream": "one running text (lines kept, no end-of-text between them)",
            "line": "one document per line", "blank_line": "documents between empty lines",
            "records": "one document per record"}


def shifted_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of each next token (labels -100 skipped) and how many tokens were scored."""
    labels = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                            ignore_index=-100, reduction="sum")
    return float(nll), int((labels != -100).sum())


@torch.no_grad()
def nll_sum(composition: Composition, blocks: Blocks, context_tokens: int = 0) -> tuple[float, int]:
    """Summed next-token NLL and token count over one batch of blocks.

    With `context_tokens`, the first tokens of each block are context only (never scored), and a
    composition that decides from its prompt (a router) is given just that context: it chooses from
    it, then steps through the rest, so it never reads the tokens it is scored on. Other compositions
    score the same tokens in one prefill.
    """
    labels = blocks.labels
    if context_tokens:
        labels = labels.clone()
        labels[:, :context_tokens] = -100
        if composition.decides_from_prompt:
            return _routed_nll(composition, blocks.input_ids, labels, context_tokens)
    logits, _ = composition.prefill(blocks.input_ids, blocks.attention_mask)
    return shifted_nll(logits, labels)


def _routed_nll(composition: Composition, ids: torch.Tensor, labels: torch.Tensor,
                context_tokens: int) -> tuple[float, int]:
    """The NLL of tokens context_tokens.. when the composition may read only the tokens before them."""
    rows = [(row[:context_tokens].tolist(), row[context_tokens:].tolist()) for row in ids]
    scored = continuation_log_probs(composition, rows, pad=0)  # full blocks: the pad id is never used
    kept = (labels[:, context_tokens:] != -100).cpu()
    total = -sum(float(s.log_probs[k].sum()) for s, k in zip(scored, kept))
    return total, int(kept.sum())


def test_blocks(config: ProjectConfig, tokenizer, readings: dict | None = None) -> dict[str, Blocks]:
    """Each domain's test split (the general one first), capped at evaluation.max_blocks.

    `readings`, when given, receives how each domain's text was read (see data.Corpus.reading).
    """
    ev = config.evaluation
    out = {}
    for domain in config.all_domains():
        corpus = load_corpus(domain)
        if readings is not None:
            readings[domain.name] = corpus.reading
        blocks = make_blocks(tokenizer, corpus, "test", ev.block_size, domain.task)
        out[domain.name] = blocks.take(scored_blocks(len(blocks), ev.max_blocks, ev.sample))
    return out


def scored_blocks(available: int, cap: int | None, sample: str) -> slice | torch.Tensor:
    """Which of a split's blocks the scorecard scores: all of them, the first `cap`, or `cap` evenly spaced."""
    if not cap or cap >= available:
        return slice(0, available)
    if sample == "first":
        return slice(0, cap)
    return torch.linspace(0, available - 1, cap).round().long()


@dataclass
class ScoreState:
    """What the scorecard's jobs share in a process: the compositions by name and the test blocks."""

    compositions: dict[str, Composition]
    blocks: dict[str, Blocks]
    batch_size: int
    context_tokens: int = 0  # see nll_sum


def score_cell(cell: tuple[str, str], state: ScoreState, advance) -> tuple[float, int]:
    """One (composition, domain) cell of the scorecard: summed NLL and token count."""
    name, domain = cell
    composition, blocks = state.compositions[name], state.blocks[domain]
    total, count = 0.0, 0
    for i in range(0, len(blocks), state.batch_size):
        t, c = nll_sum(composition, blocks.take(slice(i, i + state.batch_size)), state.context_tokens)
        total, count = total + t, count + c
        advance(info=f"{name} on {domain}")
    return total, count


def score(compositions: list[Composition], blocks_by_domain: dict[str, Blocks], batch_size: int,
          context_tokens: int = 0) -> dict:
    """{"ppl": {composition: {domain: ppl}}, "tokens": {domain: n}}, computed here on built compositions."""
    from expertkit.executors import Context, LocalExecutor

    state = ScoreState({c.name: c for c in compositions}, blocks_by_domain, batch_size, context_tokens)
    return score_on(LocalExecutor(), Context(lambda: state), [c.name for c in compositions], blocks_by_domain,
                    batch_size)


def score_on(executor, context, names: list[str], blocks_by_domain: dict[str, Blocks], batch_size: int) -> dict:
    """The scorecard as composition x domain jobs of `executor`; `context` builds a ScoreState per worker."""
    from expertkit.executors import Job

    cells = [(name, domain) for domain in blocks_by_domain for name in names]
    jobs = [Job(f"{n} on {d}", (n, d), total=math.ceil(len(blocks_by_domain[d]) / batch_size)) for n, d in cells]
    results = executor.map(score_cell, jobs, context, title="scorecard")
    ppl: dict[str, dict[str, float]] = {name: {} for name in names}
    tokens = {}
    for (name, domain), (total, count) in zip(cells, results):
        ppl[name][domain] = math.exp(total / max(count, 1))
        tokens[domain] = count
    return {"ppl": ppl, "tokens": tokens}


def verdicts(card: dict, expert_domains: dict[str, str], general: str | None) -> list[str]:
    """One line per expert: own-domain gain and general-domain change vs the base."""
    ppl = card["ppl"]
    lines = []
    for expert, domain in expert_domains.items():
        if expert not in ppl or domain not in ppl["base"]:
            continue
        gain = 1 - ppl[expert][domain] / ppl["base"][domain]
        line = f"{domain}: expert '{expert}' perplexity {ppl[expert][domain]:.2f} vs base {ppl['base'][domain]:.2f} " \
               f"({gain:+.1%} better)"
        if general and general in ppl[expert]:
            drift = ppl[expert][general] / ppl["base"][general] - 1
            line += f"; on {general} {drift:+.1%} vs base ({'kept' if drift <= 0.03 else 'FORGOT'})"
        lines.append(("OK   " if gain > 0 else "WORSE ") + line)
    return lines


def markdown_table(card: dict) -> str:
    ppl = card["ppl"]
    domains = list(next(iter(ppl.values())).keys())
    head = "| composition | " + " | ".join(domains) + " |\n|---|" + "---:|" * len(domains) + "\n"
    rows = "".join(f"| {name} | " + " | ".join(f"{row[d]:.2f}" for d in domains) + " |\n" for name, row in ppl.items())
    return head + rows


def plot_heatmap(card: dict, path: Path) -> None:
    """Perplexity relative to the base per domain (green = better than base)."""
    from expertkit.plots import heatmap

    ppl = card["ppl"]
    names, domains = list(ppl), list(ppl["base"])
    heatmap(path, names, domains, [[ppl[n][d] / ppl["base"][d] for d in domains] for n in names],
            [[ppl[n][d] for d in domains] for n in names], ("RdYlGn_r", 0.5, 1.5), "perplexity / base perplexity",
            "test perplexity (colour: relative to base)")


def write_report(card: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    ensure_writable_dir(out, "scorecard folder")
    card = {**card, "environment": environment()}
    paths = {"json": out / "scorecard.json", "md": out / "scorecard.md", "png": out / "scorecard.png"}
    atomic_write_text(paths["json"], json.dumps(card, indent=2) + "\n")
    context = card.get("context_tokens")
    scored = f" of every token after the first {context} of each block (context only: routers decide from it)" \
        if context else ""
    md = f"# expertkit scorecard\n\nToken-level test perplexity{scored} (lower is better).\n\n" + markdown_table(card)
    if card.get("readings"):
        md += "\nText read as: " + ", ".join(f"{d}: " + " + ".join(READINGS.get(part, part) for part in r.split("+"))
                                     for d, r in card["readings"].items()) + "\n"
    if card.get("verdicts"):
        md += "\n" + "\n".join(f"- {v}" for v in card["verdicts"]) + "\n"
    atomic_write_text(paths["md"], md)
    plot_heatmap(card, paths["png"])
    return paths


def environment() -> dict:
    """Exact versions the numbers were produced with."""
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}
