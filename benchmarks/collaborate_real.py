"""Suite `collaborate` on real checkpoints: cheap small experts steering a real large model (proxy-tuning).

- `--large smollm2-135m --small distilled`: the small model is the companion `expertkit base distill` makes for
  the large one (its tokenizer, at most 1/5 of its parameters), with one LoRA expert per domain trained on the
  same data and steps as the reference "truly tuned" large experts (the specialize suite's library); only their
  learning rate is their own (chosen with α on the validation split). Two designs of those experts, each
  reported: trained on their own text (proxy-tuning as published), and trained through the proxy with the large
  model frozen (`training.proxy_for`, expertkit/proxy_loss.py); the headline figures are the design and rate
  that do best on validation.
- `--large gemma3-270m --small smollm2-135m`: across vocabularies (compose/vocab.py's text alignment); the small
  experts are SmolLM2's specialize-suite experts.

α is chosen per expert on the validation split (each domain's best; a user tunes each expert's strength on its
own held-out text); on test, gap closed = (loss_large - loss_proxy) / (loss_large - loss_tuned).
Speed: batch 1, greedy, the same decode loop (prefill + step) for the large model alone and for the proxy.
Goals: mean gap closed >= 70% with a companion (>= 50% across vocabularies), the proxy better than the small
expert alone on every domain, proxy speed >= 0.75x the large model alone.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from collaborate import _gap, _references, _score, choose_alpha, loop_tok_s
from common import distilled_companion, real_config

# The companion's experts see the reference's data and steps; their rate and rank are chosen with α on validation.
# Rank 64 (alpha 128: the same scale as r=8 / 16) added 6 points of validation gap over rank 8 for experts trained
# alone. Through the proxy, one recipe: each of its steps costs a forward of the large model.
WIDE = {"rank": 64, "alpha": 128.0}
SMALL_RECIPES = [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}, {"learning_rate": 3e-3, **WIDE}]
THROUGH_PROXY_RECIPES = [{"learning_rate": 3e-3, **WIDE}]
DESIGNS = {False: "alone", True: "through_proxy"}
ALPHAS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
TEST_BLOCKS, VALID_BLOCKS = 32, 16
NEW_TOKENS, PROMPT_TOKENS, REPEATS, SAMPLE_TOKENS = 64, 32, 3, 40
GAP_GOAL = {True: 0.70, False: 0.50}  # same vocabulary / across vocabularies
SPEED_GOAL = 0.75


def _small_sides(data: Path, large_name: str, large_cfg, small_name: str, device) -> list:
    """[(small model's config, base)], its experts trained (cached) on the same domains as the large one's:
    the companion with each of SMALL_RECIPES on their own and THROUGH_PROXY_RECIPES through the proxy, or another
    real model's specialize-suite experts."""
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    if small_name == "distilled":
        companion = distilled_companion(data, large_name)
        recipes = SMALL_RECIPES + [{**r, "proxy_for": large_cfg.base.path} for r in THROUGH_PROXY_RECIPES]
        configs = [real_config(data, companion.name, recipe=recipe, model_dir=companion) for recipe in recipes]
    else:
        configs = [real_config(data, small_name)]
    sides = []
    for cfg in configs:
        cfg, small = load_project_base(cfg, device)
        train_all(cfg, small)
        sides.append((cfg, small))
    return sides


def _quality(large_cfg, large_pool, small_pool, experts, alphas: dict[str, float], same_vocab: bool,
             batch_size: int) -> dict:
    """Per domain, test perplexity (large model's tokens) of the large model, its tuned expert, the proxy at the
    domain's α, and (one vocabulary) the small expert alone."""
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.compose.collaborate import ProxyComposition
    from expertkit.evaluate import test_blocks

    blocks = {d: b.take(slice(0, TEST_BLOCKS)) for d, b in test_blocks(large_cfg, large_pool.tokenizer).items()}
    rows = {}
    for d in experts:
        compositions = _references(large_pool, d) + [ProxyComposition(large_pool, small_pool, d, alpha=alphas[d],
                                                                      name="proxy")]
        if same_vocab:
            compositions.append(AdapterComposition(small_pool, d, "small_expert"))
        rows[d] = _score(compositions, d, blocks[d], batch_size)
        rows[d]["gap_closed"] = _gap(rows[d], "proxy")
    return rows


def _prompts(large_cfg, tokenizer, experts) -> dict[str, torch.Tensor]:
    """Per domain, the first PROMPT_TOKENS tokens of its first test document, as the large model reads them."""
    from expertkit.data import load_corpus
    from expertkit.encoding import encode_texts

    out = {}
    for d in experts:
        text = load_corpus(large_cfg.domain(d)).splits["test"][0].full_text
        out[d] = torch.tensor([encode_texts(tokenizer, [text])[0][:PROMPT_TOKENS]])
    return out


def _speed(large_pool, small_pool, expert: str, alpha: float, prompt: torch.Tensor) -> dict:
    """Median over REPEATS (after one warm-up round) of large alone and proxy, run one after the other."""
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.compose.collaborate import ProxyComposition
    from expertkit.runtime import BASE_ADAPTER

    fns = {"large_tok_s": AdapterComposition(large_pool, BASE_ADAPTER, "large"),
           "proxy_tok_s": ProxyComposition(large_pool, small_pool, expert, alpha=alpha)}
    runs = {key: [] for key in fns}
    for _ in range(REPEATS + 1):
        for key, composition in fns.items():
            runs[key].append(loop_tok_s(composition, prompt, NEW_TOKENS))
    result = {k: statistics.median(v[1:]) for k, v in runs.items()}
    result["proxy_vs_large"] = result["proxy_tok_s"] / result["large_tok_s"]
    return result


def _samples(large_pool, small_pool, experts, alphas: dict[str, float], prompts: dict) -> list[dict]:
    """Greedy continuations of each domain's prompt: the large model alone, and steered by the domain's expert."""
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.compose.collaborate import ProxyComposition
    from expertkit.runtime import BASE_ADAPTER, SamplingParams, generate

    tok, greedy = large_pool.tokenizer, SamplingParams(max_new_tokens=SAMPLE_TOKENS)
    out = []
    for d in experts:
        prompt = tok.decode(prompts[d][0], skip_special_tokens=True)
        large = generate(AdapterComposition(large_pool, BASE_ADAPTER, "large"), tok, [prompt], greedy)[0]
        proxy = generate(ProxyComposition(large_pool, small_pool, d, alpha=alphas[d]), tok, [prompt], greedy)[0]
        out.append({"domain": d, "prompt": prompt, "large": large, "proxy": proxy})
    return out


def run_real(data: Path, device: str | None, large_name: str, small_name: str) -> dict:
    from expertkit.base import companion_teacher
    from expertkit.errors import ExpertkitError
    from expertkit.library import Library
    from expertkit.models import MODELS
    from expertkit.runtime import ExpertPool
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    if small_name != "distilled" and small_name not in MODELS:
        raise ExpertkitError(f"--small {small_name}: give 'distilled' or one of {sorted(MODELS)}")
    if small_name == large_name:
        raise ExpertkitError("--small names the large model itself; give 'distilled' or another model")
    large_cfg, large = load_project_base(real_config(data, large_name), device)
    train_all(large_cfg, large)  # the reference: truly tuned large experts (the specialize suite's library)
    experts = [d.name for d in large_cfg.domains]
    large_pool = ExpertPool(large, Library(large_cfg.library), names=experts)
    candidates = []  # (validation mean gap at its best α, design, recipe label, choice, config, base, pool)
    for small_cfg, small in _small_sides(data, large_name, large_cfg, small_name, device):
        same_vocab = large.identity()["tokenizer_hash"] == small.identity()["tokenizer_hash"]
        batch_size = large_cfg.evaluation.batch_size if same_vocab else max(1, large_cfg.evaluation.batch_size // 2)
        small_pool = ExpertPool(small, Library(small_cfg.library), names=experts)
        choice = choose_alpha(large_cfg, large_pool, small_pool, experts, ALPHAS, VALID_BLOCKS, batch_size)
        gap = choice["valid_mean_gap_closed_per_domain_alpha"]
        design = DESIGNS[bool(small_cfg.training.proxy_for)]
        label = f"lr {small_cfg.training.learning_rate}, rank {small_cfg.training.rank}"
        candidates.append((gap, design, label, choice, small_cfg, small, small_pool))
    designs = {}  # per design, its best rate on validation, measured on test
    for design in dict.fromkeys(c[1] for c in candidates):
        _, _, label, choice, cfg, small, pool = max((c for c in candidates if c[1] == design), key=lambda c: c[0])
        rows = _quality(large_cfg, large_pool, pool, experts, choice["alpha_per_domain"], same_vocab, batch_size)
        gaps = {d: r["gap_closed"] for d, r in rows.items()}
        designs[design] = {"recipe": label, "alpha": choice["alpha_per_domain"], "gap_closed": gaps,
                           "mean_gap_closed": statistics.mean(gaps.values()), "ppl": rows,
                           "proxy_vs_small_expert": ({d: r["proxy"] / r["small_expert"] for d, r in rows.items()}
                                                     if same_vocab else None),
                           "train_seconds_per_step": _seconds_per_step(Library(cfg.library), experts)}
    _, best_design, small_recipe, chosen, small_cfg, small, small_pool = max(candidates, key=lambda c: c[0])
    alpha, best = chosen["alpha_per_domain"], designs[best_design]
    prompts = _prompts(large_cfg, large.tokenizer, experts)
    speed = _speed(large_pool, small_pool, experts[0], alpha[experts[0]], prompts[experts[0]])
    samples = _samples(large_pool, small_pool, experts, alpha, prompts)
    sizes = {"companion_params": base_parameters(small.model), "large_params": base_parameters(large.model)}
    alignment = None if same_vocab else _alignment_of(large_pool, small_pool)
    teacher = companion_teacher(small.name)
    result = {"large": large_name, "small": small_name, "small_model": small.name, "same_vocabulary": same_vocab,
              "alignment": alignment, "design": best_design, "gap_closed": best["gap_closed"],
              "mean_gap_closed": best["mean_gap_closed"], "proxy_vs_small_expert": best["proxy_vs_small_expert"],
              "speed_ratio": speed["proxy_vs_large"], **sizes, "alpha": alpha, "alpha_selection": chosen,
              "ppl": best["ppl"], "speed": speed, "samples": samples, "small_recipe": small_recipe,
              "designs": designs,
              "large_train_seconds_per_step": _seconds_per_step(Library(large_cfg.library), experts),
              "recipe_selection": {f"{c[1]}, {c[2]}": {"alpha": c[3]["alpha_per_domain"],
                                                       "valid_mean_gap_closed": c[0]}
                                   for c in candidates},
              "companion_report": _distill_report(small.name) if teacher else None}
    _print(result, GAP_GOAL[same_vocab])
    return result


def _seconds_per_step(library, experts: list[str]) -> float:
    """Mean training seconds per step of the library's experts (from their manifests)."""
    manifests = [library.get(d).manifest for d in experts]
    return sum(m["train_seconds"] for m in manifests) / sum(m["steps"] for m in manifests)


def base_parameters(model) -> int:
    """Parameters of the base model itself (its attached LoRA adapters left out)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def _alignment_of(large_pool, small_pool) -> dict:
    """The alignment every collaboration of this pair uses by default (the text alignment across vocabularies)."""
    from expertkit.compose.collaborate import check_collaborators

    alignment = check_collaborators(large_pool, small_pool, [])
    return {"method": alignment.source, "coverage": alignment.coverage}


def _distill_report(model_dir: str) -> dict:
    import json

    from expertkit.base import DISTILL_FILE

    return json.loads((Path(model_dir) / DISTILL_FILE).read_text())["report"]


def _alphas(per_domain: dict[str, float]) -> str:
    """'medical 0.75 / code 1.0 / ...' for the printed table."""
    return " / ".join(f"{d} {a}" for d, a in per_domain.items())


def _print(result: dict, gap_goal: float) -> None:
    sizes = f"{result['companion_params'] / 1e6:.1f}M vs {result['large_params'] / 1e6:.1f}M params " \
            f"({result['companion_params'] / result['large_params']:.1%})"
    print(f"\nlarge {result['large']}, small {result['small']} ({sizes}); "
          + ("one vocabulary" if result["same_vocabulary"] else
             f"aligned by {result['alignment']['method']} ({result['alignment']['coverage']:.1%} of the large "
             "vocabulary)") + f"; small experts trained {result['design'].replace('_', ' ')}, "
          f"{result['small_recipe']}, α {_alphas(result['alpha'])} (chosen on validation: "
          + ", ".join(f"{key}: α {_alphas(c['alpha'])} closes {c['valid_mean_gap_closed']:.1%}"
                      for key, c in result["recipe_selection"].items()) + ")")
    report = result["companion_report"]
    if report:
        start = (f"a cut of the teacher's layers {report['teacher_layers']}" if report.get("init") == "teacher"
                 else "the teacher's embedding only")
        print(f"companion (started as {start}) perplexity on general test text {report['companion_ppl']:.2f} vs "
              f"teacher {report['teacher_ppl']:.2f}")
    print(f"{'domain':<10}{'large':>9}{'tuned':>9}{'proxy':>9}{'small exp':>10}{'gap closed':>12}")
    for d, r in result["ppl"].items():
        small = f"{r['small_expert']:>10.2f}" if "small_expert" in r else f"{'-':>10}"
        print(f"{d:<10}{r['large']:>9.2f}{r['large_tuned']:>9.2f}{r['proxy']:>9.2f}{small}{r['gap_closed']:>12.1%}")
    mean = result["mean_gap_closed"]
    print(f"mean gap closed {mean:.1%} (goal >= {gap_goal:.0%}: {'PASS' if mean >= gap_goal else 'MISS'})")
    for design, d in result["designs"].items():
        print(f"  small experts trained {design.replace('_', ' ')} ({d['recipe']}, α {_alphas(d['alpha'])}, "
              f"{d['train_seconds_per_step']:.1f} s per training step; the large expert: "
              f"{result['large_train_seconds_per_step']:.1f} s): gap closed "
              + ", ".join(f"{k} {v:.1%}" for k, v in d["gap_closed"].items()) + f", mean {d['mean_gap_closed']:.1%}")
    if result["proxy_vs_small_expert"]:
        beats = {d: v < 1 for d, v in result["proxy_vs_small_expert"].items()}
        print("proxy perplexity / small expert alone: " + ", ".join(
            f"{d} {v:.3f}" for d, v in result["proxy_vs_small_expert"].items())
            + f" ({'PASS' if all(beats.values()) else 'MISS'}: the proxy must beat the small expert on every domain)")
    s = result["speed"]
    print(f"speed (batch 1, greedy, {NEW_TOKENS} tokens, same loop): large {s['large_tok_s']:.1f} tok/s, proxy "
          f"{s['proxy_tok_s']:.1f} tok/s = {s['proxy_vs_large']:.2f}x (goal >= {SPEED_GOAL}: "
          f"{'PASS' if s['proxy_vs_large'] >= SPEED_GOAL else 'MISS'})")
    for sample in result["samples"]:
        print(f"\n[{sample['domain']}] {sample['prompt']!r}\n  large: {sample['large']!r}\n"
              f"  proxy: {sample['proxy']!r}")
    if not math.isfinite(mean):
        print("warning: a perplexity is not finite")
