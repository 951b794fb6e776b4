"""Suite `collaborate`: small domain experts steer a large general model (proxy, fusion, defer, knowledge card).

On real checkpoints (`--large smollm2-135m --small distilled`, `--large gemma3-270m --small smollm2-135m`)
see collaborate_real.py; what follows is the micro suite.

Large = the cached `specialize` base (its LoRA experts are the "truly tuned" reference); small = a base over
4x smaller pretrained on the same mix with the same tokenizer, with one LoRA expert per domain trained on the
same data as the reference. The proxy's α is chosen on the validation split and then scored on test.
Acceptance: mean gap closed (loss_large - loss_proxy) / (loss_large - loss_large_tuned) >= 90%; at batch 1,
greedy, 128 new tokens: proxy tok/s >= 0.75 x the large model alone, timed with the same decode loop
(its own generate() is reported beside), and >= 1.3 x a three-separate-models cached implementation.
The proxy's perplexity is also reported against the small expert alone (`proxy_vs_small_expert`).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from common import GENERAL, bench_config
from suites import COLLABORATE_OPTIONS, MICRO, REAL_BASES, suite

SMALL_BUILD = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 2, "num_heads": 4}
# The small experts see exactly the data of the large-tuned reference (same steps, batch, replay, rank);
# only the learning rate is the small base's own (chosen on validation among 2e-3, 6e-3).
SMALL_RECIPE = {"learning_rate": 6e-3}
MAX_BLOCKS, VALID_BLOCKS = 48, 32
ALPHAS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]  # proxy strengths tried on the validation split
DEFER_THRESHOLDS = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.5]  # nats; ln(4096) = 8.3: 8.5 defers nothing
CARD = {"query_tokens": 32, "card_tokens": 32}  # the card is written from a block's first 32 tokens
NEW_TOKENS, PROMPT_TOKENS, REPEATS = 128, 32, 5
GAP_TARGET, LARGE_SPEED_TARGET, REFERENCE_SPEED_TARGET = 0.90, 0.75, 1.3


def _bases(data: Path, device):
    from expertkit.base import count_parameters
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    large_cfg, large = load_project_base(bench_config(data), device)
    train_all(large_cfg, large)
    small_cfg, small = load_project_base(bench_config(data, build={**SMALL_BUILD, "tokenizer": large_cfg.base.path},
                                                      recipe=SMALL_RECIPE), device)
    train_all(small_cfg, small)
    sizes = {"large_params": count_parameters(large.model), "small_params": count_parameters(small.model)}
    return large_cfg, large, small_cfg, small, sizes


def _score(compositions, domain: str, blocks, batch_size: int) -> dict[str, float]:
    """{composition name: perplexity on this domain's blocks}."""
    from expertkit.evaluate import score

    card = score(compositions, {domain: blocks}, batch_size)
    return {c.name: card["ppl"][c.name][domain] for c in compositions}


def _gap(ppl: dict, key: str) -> float:
    """(loss_large - loss_key) / (loss_large - loss_large_tuned)."""
    large, tuned = math.log(ppl["large"]), math.log(ppl["large_tuned"])
    return (large - math.log(ppl[key])) / (large - tuned)


def _references(large_pool, domain: str):
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.runtime import BASE_ADAPTER

    return [AdapterComposition(large_pool, BASE_ADAPTER, "large"), AdapterComposition(large_pool, domain, "large_tuned")]


def choose_alpha(large_cfg, large_pool, small_pool, experts: list[str], alphas: list[float] = ALPHAS,
                 valid_blocks: int = VALID_BLOCKS, batch_size: int | None = None) -> dict:
    """The proxy's α on the VALIDATION split (the test text is never looked at): `alpha`, the best mean gap closed
    over the domains (one α for every expert), and `alpha_per_domain`, each expert's own best α."""
    from expertkit.compose.collaborate import ProxyComposition
    from expertkit.workflow import validation_blocks

    valid = validation_blocks(large_cfg, large_pool.tokenizer, experts, max_blocks=valid_blocks)
    bs = batch_size or large_cfg.evaluation.batch_size
    gaps = {a: {} for a in alphas}
    for d in experts:
        ppl = _score(_references(large_pool, d) + [ProxyComposition(large_pool, small_pool, d, alpha=a, name=f"a{a}")
                                                   for a in alphas], d, valid[d], bs)
        for a in alphas:
            gaps[a][d] = _gap(ppl, f"a{a}")
    mean = {a: statistics.mean(g.values()) for a, g in gaps.items()}
    own = {d: max(alphas, key=lambda a: gaps[a][d]) for d in experts}
    return {"alpha": max(mean, key=mean.get), "valid_mean_gap_closed": mean, "valid_gap_closed": gaps,
            "alpha_per_domain": own, "valid_mean_gap_closed_per_domain_alpha":
                statistics.mean(gaps[own[d]][d] for d in experts)}


def quality(large_cfg, large_pool, small_pool, experts: list[str], alpha: float) -> dict:
    """Per-domain test perplexity of large, large tuned, small expert, proxy, fusion, card; the defer sweep."""
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.compose.card import KnowledgeCardComposition
    from expertkit.compose.collaborate import DeferComposition, FusionComposition, ProxyComposition
    from expertkit.evaluate import test_blocks

    blocks = {d: b.take(slice(0, MAX_BLOCKS)) for d, b in test_blocks(large_cfg, large_pool.tokenizer).items()}
    bs = large_cfg.evaluation.batch_size
    out = {"domains": {}, "defer": [], "card_fraction": {}}
    fusion = FusionComposition(large_pool, small_pool, experts, alpha=alpha, name="fusion")
    for d in experts:
        card = KnowledgeCardComposition(large_pool, small_pool, d, name="card", **CARD)
        rows = _score(_references(large_pool, d) + [
            AdapterComposition(small_pool, d, "small_expert"),
            ProxyComposition(large_pool, small_pool, d, alpha=alpha, name="proxy"), fusion, card], d, blocks[d], bs)
        for key in ("proxy", "fusion", "card"):
            rows[f"{key}_gap_closed"] = _gap(rows, key)
        rows["gap_closed"] = rows["proxy_gap_closed"]
        out["domains"][d] = rows
        out["card_fraction"][d] = card.stats()["card_fraction"]
    out["fusion_general"] = _score([fusion, _references(large_pool, GENERAL)[0]],
                                   GENERAL, blocks[GENERAL], bs)
    for threshold in DEFER_THRESHOLDS:
        point = {"threshold": threshold, "ppl": {}, "deferred": {}}
        for d in experts:
            defer = DeferComposition(large_pool, small_pool, d, threshold=threshold, name="defer")
            point["ppl"][d] = _score([defer], d, blocks[d], bs)["defer"]
            point["deferred"][d] = defer.deferred_fraction
        point["mean_deferred"] = statistics.mean(point["deferred"].values())
        point["mean_log_ppl"] = statistics.mean(math.log(v) for v in point["ppl"].values())
        out["defer"].append(point)
    return out


@torch.no_grad()
def _greedy_tok_s(prefill, step, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> float:
    """Tokens per second of a prefill + step greedy loop producing exactly `new_tokens` tokens."""
    started = time.perf_counter()
    logits, state = prefill(ids)
    token = logits[:, -1].argmax(-1)
    for _ in range(new_tokens - 1):
        logits, state = step(state, token)
        token = logits.argmax(-1)
    return new_tokens / (time.perf_counter() - started)


def loop_tok_s(composition, prompt_ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> float:
    """The same greedy prefill + step loop for every composition timed against each other."""
    mask = torch.ones_like(prompt_ids)
    return _greedy_tok_s(lambda ids: composition.prefill(ids, mask), composition.step, prompt_ids, new_tokens)


@torch.no_grad()
def speed(large_path: str, small_pool, expert: str, prompt_ids: torch.Tensor, alpha: float = 1.0) -> dict:
    """Side by side, one run after another, median of REPEATS: large generate(), proxy, three-model reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    from expertkit.base import load_base
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.compose.collaborate import ProxyComposition
    from expertkit.runtime import BASE_ADAPTER, ExpertPool
    from expertkit.runtime.hf_cache import cache_keyword, returned_cache

    large_model = AutoModelForCausalLM.from_pretrained(large_path).eval()
    small_path = small_pool.base.name
    small_base_model = AutoModelForCausalLM.from_pretrained(small_path).eval()
    expert_dir = next(e.path for e in small_pool.entries if e.name == expert)
    small_expert_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_path),
                                                   str(expert_dir)).merge_and_unload().eval()
    large_pool = ExpertPool(load_base(large_path, "cpu"))
    proxy = ProxyComposition(large_pool, small_pool, expert, alpha=alpha)
    proxy_hf = ProxyComposition(large_pool, small_pool, expert, alpha=alpha, fast_small=False)
    large_alone = AdapterComposition(large_pool, BASE_ADAPTER, "large")
    mask = torch.ones_like(prompt_ids)

    def generate_large() -> float:
        started = time.perf_counter()
        out = large_model.generate(prompt_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return (out.shape[1] - prompt_ids.shape[1]) / (time.perf_counter() - started)

    def three_models() -> float:
        """The reference design: three separate cached models, three forwards per token."""
        models, caches = [large_model, small_expert_model, small_base_model], []

        def combined(ids):
            outs = [m(input_ids=ids, use_cache=True, **{cache_keyword(m): c}) for m, c in zip(models, caches)]
            caches[:] = [returned_cache(o) for o in outs]
            large_lp, expert_lp, base_lp = (torch.log_softmax(o.logits.float(), -1) for o in outs)
            return large_lp + alpha * (expert_lp - base_lp)

        def prefill(ids):
            caches[:] = [DynamicCache() for _ in models]
            return combined(ids), None

        return _greedy_tok_s(prefill, lambda _, token: (combined(token.view(1, 1))[:, -1], None), prompt_ids)

    fns = {"large_tok_s": lambda: loop_tok_s(large_alone, prompt_ids), "large_generate_tok_s": generate_large,
           "proxy_tok_s": lambda: loop_tok_s(proxy, prompt_ids), "three_model_tok_s": three_models,
           "proxy_hf_small_step_tok_s": lambda: loop_tok_s(proxy_hf, prompt_ids)}  # the last: PEFT adapter_names steps
    runs = {key: [] for key in fns}
    for _ in range(REPEATS + 1):  # the first round warms up and is dropped
        for key, fn in fns.items():
            runs[key].append(fn())
    result = {k: statistics.median(v[1:]) for k, v in runs.items()}
    result["proxy_vs_large"] = result["proxy_tok_s"] / result["large_tok_s"]  # like for like: the same loop
    result["proxy_vs_large_generate"] = result["proxy_tok_s"] / result["large_generate_tok_s"]
    result["proxy_vs_three_models"] = result["proxy_tok_s"] / result["three_model_tok_s"]
    return result


def plot_defer(points: list[dict], path: Path, references: dict[str, float]) -> None:
    """Perplexity vs fraction deferred; the large model (alone and tuned), the proxy and the small expert as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["mean_deferred"] for p in points], [math.exp(p["mean_log_ppl"]) for p in points], "o-")
    for p in points:
        ax.annotate(f"τ={p['threshold']}", (p["mean_deferred"], math.exp(p["mean_log_ppl"])), fontsize=7)
    for (label, ppl), style in zip(references.items(), ("k--", "b-.", "g--", "r:")):
        ax.axhline(ppl, color=style[0], linestyle=style[1:], linewidth=1, label=label)
    ax.legend(fontsize=7)
    ax.set_xlabel("fraction of tokens deferred to the large model")
    ax.set_ylabel("perplexity (geometric mean over domains)")
    ax.set_title("defer: quality vs tokens deferred")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@suite("collaborate", bases=(MICRO, *REAL_BASES))
def run(data: Path, device: str | None, base: str = MICRO) -> dict:
    if base != MICRO:
        from collaborate_real import run_real

        return run_real(data, device, base, COLLABORATE_OPTIONS["small"])
    return run_micro(data, device)


def run_micro(data: Path, device: str | None) -> dict:
    from expertkit.data import load_corpus
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool

    large_cfg, large, small_cfg, small, sizes = _bases(data, device)
    experts = [d.name for d in large_cfg.domains]
    large_pool = ExpertPool(large, Library(large_cfg.library), names=experts)
    small_pool = ExpertPool(small, Library(small_cfg.library), names=experts)
    chosen = choose_alpha(large_cfg, large_pool, small_pool, experts)
    alpha = chosen["alpha"]
    q = quality(large_cfg, large_pool, small_pool, experts, alpha)
    text = load_corpus(large_cfg.domain(experts[0])).splits["test"][0].full_text
    prompt = torch.tensor([large.tokenizer(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]])
    s = speed(large_cfg.base.path, small_pool, experts[0], prompt, alpha)
    png = Path(__file__).resolve().parent / "results" / "collaborate_defer.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    geo = lambda key: math.exp(statistics.mean(math.log(r[key]) for r in q["domains"].values()))  # noqa: E731
    plot_defer(q["defer"], png, {"large": geo("large"), "large tuned": geo("large_tuned"), f"proxy (α={alpha})": geo("proxy"),
                                 "small expert alone": geo("small_expert")})
    gaps = {d: r["gap_closed"] for d, r in q["domains"].items()}
    vs_small = {d: r["proxy"] / r["small_expert"] for d, r in q["domains"].items()}  # < 1: the proxy is better
    mean_of = lambda key: statistics.mean(r[key] for r in q["domains"].values())  # noqa: E731
    result = {"gap_closed": gaps, "mean_gap_closed": statistics.mean(gaps.values()), "alpha": alpha,
              "proxy_vs_small_expert": vs_small, "speed_ratio": s["proxy_vs_large"],
              "alpha_selection": chosen, "speed": s, "defer": q["defer"],
              "fusion": {d: r["fusion"] for d, r in q["domains"].items()} | {GENERAL: q["fusion_general"]["fusion"],
                                                                             "mean_gap_closed": mean_of("fusion_gap_closed")},
              "card": {"params": CARD, "card_fraction": q["card_fraction"], "mean_gap_closed": mean_of("card_gap_closed")},
              "ppl": q["domains"], "sizes": sizes, "small_recipe": SMALL_RECIPE, "defer_plot": str(png)}
    print(f"\nlarge {sizes['large_params'] / 1e6:.2f}M params, small {sizes['small_params'] / 1e6:.2f}M "
          f"({sizes['large_params'] / sizes['small_params']:.1f}x); α = {alpha} (best mean gap closed on validation: "
          + ", ".join(f"{a}: {g:.1%}" for a, g in chosen["valid_mean_gap_closed"].items()) + ")")
    print(f"{'domain':<12}{'large':>9}{'tuned':>9}{'small exp':>10}{'proxy':>9}{'fusion':>9}{'card':>9}"
          f"{'gap closed':>12}")
    for d, r in q["domains"].items():
        print(f"{d:<12}{r['large']:>9.2f}{r['large_tuned']:>9.2f}{r['small_expert']:>10.2f}{r['proxy']:>9.2f}"
              f"{r['fusion']:>9.2f}{r['card']:>9.2f}{r['gap_closed']:>12.1%}")
    print(f"mean gap closed: proxy {result['mean_gap_closed']:.1%} (target >= {GAP_TARGET:.0%}), fusion "
          f"{mean_of('fusion_gap_closed'):.1%}, card {mean_of('card_gap_closed'):.1%}; fusion on {GENERAL}: "
          f"{q['fusion_general']['fusion']:.2f} vs large {q['fusion_general']['large']:.2f}")
    print("defer: " + ", ".join(f"τ={p['threshold']}: {p['mean_deferred']:.0%} deferred, ppl "
                                f"{math.exp(p['mean_log_ppl']):.2f}" for p in q["defer"]))
    print("proxy perplexity / small expert alone: " + ", ".join(f"{d} {v:.3f}" for d, v in vs_small.items())
          + f" (the proxy beats the small expert alone on {sum(v < 1 for v in vs_small.values())} of {len(vs_small)})")
    print(f"speed (batch 1, greedy, {NEW_TOKENS} tokens, the same loop for both): large {s['large_tok_s']:.1f} tok/s, "
          f"proxy {s['proxy_tok_s']:.1f} tok/s ({s['proxy_vs_large']:.2f}x, target >= {LARGE_SPEED_TARGET}); large "
          f"generate() {s['large_generate_tok_s']:.1f} tok/s (proxy {s['proxy_vs_large_generate']:.2f}x); three "
          f"separate models {s['three_model_tok_s']:.1f} tok/s (proxy "
          f"{s['proxy_vs_three_models']:.2f}x, target >= {REFERENCE_SPEED_TARGET}); proxy with HF/PEFT small steps "
          f"{s['proxy_hf_small_step_tok_s']:.1f} tok/s")
    return result
