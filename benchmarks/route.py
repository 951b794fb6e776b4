"""Suite `route`: routers (sequence level) and a mixture (token level) over the cached expert library.

Acceptance: best router >= 98% accurate on whole test documents and >= 90% on 32-token prefixes;
the best strategy within 2% of the oracle's perplexity on every domain, also leak-free (a router
decides from each block's first 32 tokens and only the rest is scored, for every strategy and the
oracle alike); a domain left out of the library loses <= 2% vs the base; routing a 512-token prompt costs < 5%
of generating 64 tokens. Documents are what expertkit reads from the corpora: one per line of the files on micro,
each line of the running text on a real base (routing.train.routing_units). On a real base the perplexity
comparisons score REAL_BLOCKS blocks per domain (--route-blocks), and --accuracy-only measures the routers alone.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from common import GENERAL, reuse_experts, suite_config
from suites import MICRO, REAL_BASES, ROUTE_OPTIONS, suite

DOCS_PER_DOMAIN = 200
PREFIX_TOKENS = 32
DOCS_TARGET, PREFIX_TARGET, ORACLE_TOLERANCE, HELD_OUT_TOLERANCE, COST_TARGET = 0.98, 0.90, 0.02, 0.02, 0.05
ROUTE_PROMPT_TOKENS, GENERATED_TOKENS = 512, 64
MIXTURE = "mixture"
# Leak-free scoring: each block's first tokens are the prompt a router decides from; only the rest is scored.
LEAK_FREE_CONTEXT = 32
# Test blocks per domain in the perplexity comparisons on a real base (run.py --route-blocks): the likelihood
# router and the mixture run every expert on each block, 14 s per batch of 8 on 2 CPU cores for SmolLM2
REAL_BLOCKS = 16


def comparison_blocks(blocks: dict, base_name: str) -> dict:
    """The test blocks the perplexity comparisons score: all of them, or ROUTE_OPTIONS' (REAL_BLOCKS') evenly spaced."""
    from expertkit.evaluate import scored_blocks

    cap = ROUTE_OPTIONS["blocks"] or (None if base_name == MICRO else REAL_BLOCKS)
    return {d: b.take(scored_blocks(len(b), cap, "spread")) for d, b in blocks.items()}


def build_strategies(cfg, base) -> tuple:
    """Train (or reuse: saved_router) every router kind and add the mixture to the library; returns (pool, routers,
    reports)."""
    from expertkit.compose.mix import add_mixture
    from expertkit.config import MixtureConfig
    from expertkit.library import Library
    from expertkit.routing import router_kinds, save_router, train_router
    from expertkit.runtime import ExpertPool

    library = Library(cfg.library)
    pool = ExpertPool(base, library, names=[d.name for d in cfg.domains])
    routers, reports = {}, {}
    for kind in router_kinds():
        saved = saved_router(library, kind, cfg)
        if saved is not None:
            routers[kind], reports[kind] = saved
            print(f"router {kind}: the one saved {time.ctime(reports[kind]['created'])} (trained in "
                  f"{reports[kind]['train_seconds']}s), threshold {routers[kind].threshold:.3f}")
            continue
        started = time.perf_counter()
        calibrated, report = train_router(cfg, pool, kind, f"router-{kind}")
        report["train_seconds"] = round(time.perf_counter() - started, 1)
        save_router(library, calibrated, report, overwrite=True)
        routers[kind], reports[kind] = calibrated, report
        print(f"router {kind}: trained in {report['train_seconds']}s, threshold {calibrated.threshold:.3f}, "
              f"validation {report['validation']}")
    add_mixture(library, MIXTURE, MixtureConfig(), overwrite=True)
    return pool, routers, reports


def saved_router(library, kind: str, cfg) -> tuple | None:
    """(router, its report) that an earlier run of this suite saved in the library, when it still holds: the same
    experts and routing settings, trained after each of those experts was. Training the four anew takes about 9
    minutes on SmolLM2 on 2 CPU cores."""
    from expertkit.library import Kind
    from expertkit.routing import load_router

    name = f"router-{kind}"
    if not library.has(Kind.ROUTER, name):
        return None
    entry = library.get(name)
    if "train_seconds" not in entry.manifest:
        return None
    experts = entry.manifest.get("experts", [])
    if sorted(experts) != sorted(d.name for d in cfg.domains) or not all(library.has_name(e) for e in experts):
        return None
    if any(library.get(e).manifest["created"] > entry.manifest["created"] for e in experts):
        return None
    calibrated = load_router(library, entry)
    if calibrated.settings != cfg.routing:
        return None
    return calibrated, dict(entry.manifest)


def routing_accuracy(cfg, pool, routers) -> dict:
    from expertkit.progress import progress_bar
    from expertkit.routing.calibrate import accuracy
    from expertkit.routing.train import domain_texts, label_domains, prefixes, probabilities, summary

    labels = label_domains(cfg, pool)
    documents = domain_texts(cfg, labels, "test", DOCS_PER_DOMAIN)
    sets = {"documents": documents,
            f"prefix{PREFIX_TOKENS}": {k: prefixes(pool.tokenizer, v, PREFIX_TOKENS) for k, v in documents.items()}}
    out = {}
    with progress_bar("routing accuracy (router x test set)", len(routers) * len(sets)) as advance:
        for kind, calibrated in routers.items():
            out[kind] = {}
            for name, texts in sets.items():
                probs, targets = probabilities(calibrated.router, pool, texts, calibrated.settings)
                result = summary(probs, targets, calibrated.threshold)
                out[kind][name] = result["accuracy"]
                out[kind][f"{name}_without_abstaining"] = accuracy(probs.argmax(-1), targets)
                out[kind][f"{name}_abstain_rate"] = result["abstain_rate"]
                advance(info=f"{kind} {name} {result['accuracy']:.1%}")
    return out


def perplexities(cfg, pool, names: list[str], blocks: dict, context_tokens: int = 0) -> dict:
    """Test perplexity; with context_tokens, only the tokens after them, and routers decide from them alone."""
    from expertkit.compose import build_compositions
    from expertkit.evaluate import score

    pool.ensure([n for n in names if n != "base"])
    return score(build_compositions(pool, names), blocks, cfg.evaluation.batch_size, context_tokens)["ppl"]


def oracle(cfg, pool, blocks: dict, context_tokens: int = 0) -> dict:
    """Each domain scored by its own expert (by the base for the general domain), on the same tokens."""
    own = {d: d if d != GENERAL else "base" for d in blocks}
    return {d: perplexities(cfg, pool, [own[d]], {d: blocks[d]}, context_tokens)[own[d]][d] for d in blocks}


def held_out(data: Path, device, main_cfg, base_name: str) -> dict:
    """A library without one domain: that domain's test perplexity under each strategy vs the base."""
    from expertkit.data import load_corpus, make_blocks
    from expertkit.evaluate import scored_blocks
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    domain = main_cfg.domains[-1].name
    cfg, base = load_project_base(suite_config(data, base_name, exclude=(domain,)), device)  # its own model
    reuse_experts(main_cfg, cfg, base)
    train_all(cfg, base)
    pool, routers, _ = build_strategies(cfg, base)
    ev = cfg.evaluation
    test_split = make_blocks(base.tokenizer, load_corpus(main_cfg.domain(domain)), "test", ev.block_size)
    blocks = comparison_blocks({domain: test_split.take(scored_blocks(len(test_split), ev.max_blocks, ev.sample))},
                               base_name)
    names = ["base", *(f"router-{k}" for k in routers), MIXTURE]
    ppl = {n: row[domain] for n, row in perplexities(cfg, pool, names, blocks).items()}
    loss = {n: p / ppl["base"] - 1 for n, p in ppl.items() if n != "base"}
    return {"domain": domain, "ppl": ppl, "loss_vs_base": loss}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def router_cost(cfg, pool, routers) -> dict:
    """Routing one 512-token prompt vs generating 64 tokens (prefill + 63 cached steps) with one expert."""
    from expertkit.compose import build_compositions
    from expertkit.data import load_corpus
    from expertkit.routing import Prompts

    tok = pool.tokenizer
    expert = cfg.domains[0]
    stream = tok("\n".join(ex.full_text for ex in load_corpus(expert).splits["test"][:400]),
                 add_special_tokens=False)["input_ids"][:ROUTE_PROMPT_TOKENS]
    prompt = Prompts.from_texts(tok, [tok.decode(stream)])
    (composition,) = build_compositions(pool, [expert.name])
    fit = pool.context_length - GENERATED_TOKENS
    ids = torch.tensor([stream[-fit:]])

    @torch.no_grad()
    def generate():
        logits, state = composition.prefill(ids, torch.ones_like(ids))
        next_ids = logits[:, -1].argmax(-1)
        for _ in range(GENERATED_TOKENS - 1):
            logits, state = composition.step(state, next_ids)
            next_ids = logits.argmax(-1)

    generation = median_seconds(generate, 3)
    out = {"generate_seconds": generation, "generate_prompt_tokens": ids.shape[1], "routers": {}}
    for kind, calibrated in routers.items():
        seconds = median_seconds(lambda: calibrated.route(pool, prompt), 5)
        out["routers"][kind] = {"seconds": seconds, "ratio": seconds / generation}
    return out


def print_accuracy(result: dict) -> None:
    print(f"\n{'router':<12} {'documents':>10} {'prefix32':>9} {'(argmax docs':>13} {'prefix)':>8} {'cost':>7}")
    for kind, acc in result["accuracy"].items():
        cost = result["router_cost"]["routers"][kind]["ratio"]
        print(f"{kind:<12} {acc['documents']:>10.2%} {acc['prefix32']:>9.2%} "
              f"{acc['documents_without_abstaining']:>13.2%} {acc['prefix32_without_abstaining']:>8.2%} {cost:>7.2%}")


def print_perplexities(result: dict, domains: list[str]) -> None:
    for title, ppl, reference in (("perplexity (routed from the whole block)", result["ppl"], result["oracle"]),
                                  (f"leak-free (routed from the first {result['leak_free_context_tokens']} tokens, "
                                   "the rest scored)", result["leak_free"], result["leak_free_oracle"])):
        print(f"\n{title}\n{'composition':<18} " + " ".join(f"{d:>10}" for d in domains) + f" {'worst vs oracle':>16}")
        for name, row in {"oracle": reference, **ppl}.items():
            worst = max(row[d] / reference[d] - 1 for d in domains)
            print(f"{name:<18} " + " ".join(f"{row[d]:>10.2f}" for d in domains) + f" {worst:>+16.2%}")
    held = result["held_out_domain"]
    print(f"\nheld-out domain '{held['domain']}' (library without it): base ppl {held['ppl']['base']:.2f}; "
          + ", ".join(f"{n} {v:+.2%}" for n, v in held["loss_vs_base"].items()))


def accuracy_checks(result: dict) -> dict:
    """The routers' own checks: the best one's document accuracy, the best prefix accuracy, the best one's cost."""
    best_router = max(result["accuracy"], key=lambda k: result["accuracy"][k]["documents"])
    return {
        "best_router": best_router,
        "documents": result["accuracy"][best_router]["documents"] >= DOCS_TARGET,
        "prefix32": max(a["prefix32"] for a in result["accuracy"].values()) >= PREFIX_TARGET,
        "router_cost": result["router_cost"]["routers"][best_router]["ratio"] < COST_TARGET,
        "cheapest_router_cost_ratio": min(r["ratio"] for r in result["router_cost"]["routers"].values()),
    }


def perplexity_checks(result: dict, domains: list[str]) -> dict:
    """The strategies' checks: the best within the oracle's tolerance (also leak-free), the held-out domain kept."""
    gaps = {n: max(row[d] / result["oracle"][d] - 1 for d in domains) for n, row in result["ppl"].items()}
    free_gaps = {n: max(row[d] / result["leak_free_oracle"][d] - 1 for d in domains)
                 for n, row in result["leak_free"].items()}
    held = result["held_out_domain"]["loss_vs_base"]
    return {
        "best_strategy": min(gaps, key=gaps.get), "worst_gap_of_best_strategy": min(gaps.values()),
        "within_oracle": min(gaps.values()) <= ORACLE_TOLERANCE,
        "leak_free_best_strategy": min(free_gaps, key=free_gaps.get),
        "leak_free_worst_gap_of_best_strategy": min(free_gaps.values()),
        "leak_free_within_oracle": min(free_gaps.values()) <= ORACLE_TOLERANCE,
        "held_out": min(held.values()) <= HELD_OUT_TOLERANCE,
        "held_out_best_strategy_loss": held[min(gaps, key=gaps.get)],
    }


@suite("route", bases=(MICRO, *REAL_BASES))
def run(data: Path, device: str | None, base_name: str = MICRO) -> dict:
    from expertkit.evaluate import test_blocks
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    cfg, base = load_project_base(suite_config(data, base_name), device)
    train_all(cfg, base)
    if ROUTE_OPTIONS["prompts"]:
        from route_prompts import run_prompts

        from expertkit.library import Library
        from expertkit.runtime import ExpertPool

        return {"base_model": base_name, **run_prompts(cfg, base, ExpertPool(base, Library(cfg.library),
                                                                             names=[d.name for d in cfg.domains]))}
    pool, routers, reports = build_strategies(cfg, base)
    result = {"base_model": base_name, "accuracy": routing_accuracy(cfg, pool, routers),
              "router_cost": router_cost(cfg, pool, routers)}
    result["checks"] = accuracy_checks(result)
    result["router_cost_ratio"] = result["router_cost"]["routers"][result["checks"]["best_router"]]["ratio"]
    result["accuracy_only"] = ROUTE_OPTIONS["accuracy_only"]
    if not result["accuracy_only"]:
        blocks = comparison_blocks(test_blocks(cfg, base.tokenizer), base_name)
        result["blocks_per_domain"] = {d: len(b) for d, b in blocks.items()}
        strategies = [*(f"router-{k}" for k in routers), MIXTURE]
        result["ppl"] = perplexities(cfg, pool, strategies, blocks)
        result["oracle"] = oracle(cfg, pool, blocks)
        result["leak_free_context_tokens"] = LEAK_FREE_CONTEXT
        result["leak_free"] = perplexities(cfg, pool, strategies, blocks, LEAK_FREE_CONTEXT)
        result["leak_free_oracle"] = oracle(cfg, pool, blocks, LEAK_FREE_CONTEXT)
        result["held_out_domain"] = held_out(data, device, cfg, base_name)
        result["checks"].update(perplexity_checks(result, list(blocks)))
    result["routers"] = reports
    result["config"] = cfg.model_dump()
    print_accuracy(result)
    if not result["accuracy_only"]:
        print_perplexities(result, list(result["blocks_per_domain"]))
    print("checks:", result["checks"])
    return result
