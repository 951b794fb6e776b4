"""`route --prompts`: routing what users type, measured on real questions, never on the routers' training text.

General prompts (must go to the base): the contexts of the six general tasks in ../shared/tasks, without
their choices. A hashed quarter of each task's examples is the base's prompt file the routers train on
(`routing.prompts`, as a team would give its logged everyday requests); only the other three quarters
are measured. Domain prompts (must go to their expert): PubMedQA questions (medical), AG News titles and
descriptions (news), a function's signature and docstring from the code test split (code). The routers
never see a domain prompt: they learn the domains from the corpora alone. Every prompt is routed raw and
chat-formatted (the model's chat template, as the server renders a chat request).

Acceptance: the best router >= 90% on each kind; the routed composition's task accuracy on the general
tasks within 0.5 point of the base's and on each domain task within 0.5 point of its expert's; routing
costs under 5% of generating 64 tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from common import CACHE
from suites import TASK_EXAMPLES

GENERAL_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "sciq")
PER_GENERAL_TASK = 100  # measured general prompts per task (600 in all)
PER_DOMAIN = 200  # measured prompts per domain expert, at most
TRAIN_SHARE = 0.25  # of each general task (by a hash of the example id): the base's prompt file, never measured
ACCURACY_TARGET, TASK_TOLERANCE_POINTS, COST_TARGET = 0.90, 0.5, 0.05
DEF = re.compile(r"^\s*def \w+\(")


def in_training_share(key: str) -> bool:
    from expertkit.routing.train import held_out  # the hashed split routing.prompts files get

    return held_out(key, TRAIN_SHARE)


def general_prompts(tasks: Path) -> tuple[list[str], list[str]]:
    """(the base's training prompts, the measured general prompts) from the six general tasks."""
    train, measured = [], []
    for task in GENERAL_TASKS:
        rows = [json.loads(line) for line in (tasks / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        train += [r["context"] for r in rows if in_training_share(r["id"])]
        measured += [r["context"] for r in rows if not in_training_share(r["id"])][:PER_GENERAL_TASK]
    return train, measured


def domain_prompts(corpora: Path, experts: dict[str, str]) -> dict[str, list[str]]:
    """{expert: its domain's prompts} for the experts whose domain has a prompt source here."""
    sources = {"medical": _pubmedqa, "news": _agnews, "code": _code_signatures}
    return {expert: sources[domain](corpora / domain)[:PER_DOMAIN] for expert, domain in experts.items()
            if domain in sources}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pubmedqa(folder: Path) -> list[str]:
    return [row["question"] for row in _jsonl(folder / "eval_pubmedqa.jsonl")]


def _agnews(folder: Path) -> list[str]:
    return [f"{row['title']}\n{row['description']}" for row in _jsonl(folder / "eval_agnews_topic.jsonl")]


def _code_signatures(folder: Path) -> list[str]:
    """Each function of the test split that has a docstring: its signature and the docstring, as a request."""
    lines = (folder / "test.txt").read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not DEF.match(line):
            continue
        end = i
        while end < len(lines) and not lines[end].rstrip().endswith(":"):
            end += 1
        body = end + 1
        if body >= len(lines) or not lines[body].strip().startswith(('"""', "'''")):
            continue
        quote = lines[body].strip()[:3]
        close = body if lines[body].strip().count(quote) >= 2 else next(
            (j for j in range(body + 1, min(len(lines), body + 40)) if quote in lines[j]), None)
        if close is not None:
            out.append("\n".join(lines[i:close + 1]))
    return out


def prompt_sets(tokenizer, general: list[str], domain: dict[str, list[str]]) -> dict:
    """{format: (Prompts, target labels)} for raw prompts and chat-formatted ones, read as the server reads them."""
    from expertkit.encoding import encode_texts
    from expertkit.library import BASE
    from expertkit.routing import Prompts

    texts = general + [p for prompts in domain.values() for p in prompts]
    targets = [BASE] * len(general) + [e for e, prompts in domain.items() for _ in prompts]
    sets = {"raw": (Prompts.from_ids(tokenizer, encode_texts(tokenizer, texts)), targets)}
    if getattr(tokenizer, "chat_template", None):  # the micro base has none: raw prompts only
        chat = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"] for t in texts]
        sets["chat"] = (Prompts.from_ids(tokenizer, chat), targets)
    return sets


def prompt_accuracy(calibrated, pool, sets: dict) -> dict:
    """Accuracy on general prompts (-> base) and domain prompts (-> their expert), per format and overall."""
    from expertkit.library import BASE

    out = {}
    for fmt, (prompts, targets) in sets.items():
        routing = calibrated.route(pool, prompts)
        right = [c == t for c, t in zip(routing.chosen, targets)]
        general = [r for r, t in zip(right, targets) if t == BASE]
        domain = [r for r, t in zip(right, targets) if t != BASE]
        abstained = routing.abstained.tolist()
        out[fmt] = {"general": sum(general) / len(general), "domain": sum(domain) / len(domain),
                    "abstain_rate": sum(abstained) / len(abstained), "general_n": len(general),
                    "domain_n": len(domain)}
    out["general"] = sum(out[f]["general"] for f in sets) / len(sets)  # the formats weigh the same
    out["domain"] = sum(out[f]["domain"] for f in sets) / len(sets)
    return out


def run_prompts(cfg, base, pool) -> dict:
    """Train every router kind with the base's prompt file, measure them on prompts, and score the best routed."""
    from expertkit.library import Kind, Library
    from expertkit.routing import router_kinds, save_router, train_router
    from expertkit.workflow import run_task_scorecard

    from route import router_cost

    corpora = Path(cfg.general.source.path).parent
    library = Library(cfg.library)
    experts = {e.name: e.domain for e in pool.entries if e.kind == Kind.EXPERT}  # the suite's domains only
    train, general = general_prompts(corpora.parent / "tasks")
    domain = domain_prompts(corpora, experts)
    prompt_file = CACHE / "route-prompts" / "base-prompts.jsonl"  # JSONL: task contexts span lines
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text("\n".join(json.dumps({"text": t}) for t in train) + "\n", encoding="utf-8")
    routing = cfg.routing.model_copy(update={"prompts": {"base": str(prompt_file)}})
    cfg = cfg.model_copy(update={"routing": routing})
    sets = prompt_sets(pool.tokenizer, general, domain)
    print(f"prompts: {len(general)} general, " + ", ".join(f"{len(v)} {k}" for k, v in domain.items())
          + f"; the base's training prompt file holds {len(train)} (disjoint)")
    accuracy, routers, reports = {}, {}, {}
    for kind in router_kinds():
        calibrated, report = train_router(cfg, pool, kind, f"router-{kind}")
        save_router(library, calibrated, report, overwrite=True)
        routers[kind], reports[kind] = calibrated, report
        accuracy[kind] = prompt_accuracy(calibrated, pool, sets)
        print(f"router {kind}: general {accuracy[kind]['general']:.1%}, domain {accuracy[kind]['domain']:.1%} ("
              + ", ".join(f"{fmt} {accuracy[kind][fmt]['general']:.1%}/{accuracy[kind][fmt]['domain']:.1%}"
                          for fmt in sets) + ")", flush=True)
    best = max(accuracy, key=lambda k: min(accuracy[k]["general"], accuracy[k]["domain"]))
    cost = router_cost(cfg, pool, {best: routers[best]})["routers"][best]["ratio"]
    tasks = routed_tasks(cfg, base, experts, f"router-{best}", run_task_scorecard)
    result = {"prompt_accuracy": {k: {"general": v["general"], "domain": v["domain"]} for k, v in accuracy.items()},
              "prompt_accuracy_detail": accuracy, "best_router": best, "router_cost_ratio": cost, **tasks,
              "prompts": {"general": len(general), **{k: len(v) for k, v in domain.items()},
                          "base_training_prompts": len(train)}, "routers": reports}
    result["checks"] = checks(result)
    print_table(result)
    return result


def routed_tasks(cfg, base, experts: dict[str, str], router: str, run_task_scorecard) -> dict:
    """Task accuracy (each task by its own metric) of the routed composition, the base, and each domain
    task's own expert."""
    from expertkit.tasks.local import task_kinds
    from expertkit.tasks.run import score, task_metrics

    out = Path(cfg.library).parent / (Path(cfg.library).name + "-tasks")  # the specialize suite's task cache
    card = run_task_scorecard(cfg, base, ["general", "domain"], out=out, names=["base", *experts, router],
                              limit=TASK_EXAMPLES["per_task"])
    table = {(r["composition"], r["task"]): score(r)[0] for r in card["rows"]}
    tasks = sorted({t for _, t in table})
    kinds = task_kinds()
    own = {t: e for t in tasks for e, d in experts.items() if kinds.get(t) == d}
    return {"routed_task_acc": {t: table[(router, t)] for t in tasks},
            "base_task_acc": {t: table[("base", t)] for t in tasks},
            "expert_task_acc": {t: table[(e, t)] for t, e in own.items()}, "task_experts": own,
            "task_metrics": task_metrics(card["rows"]),
            "task_examples_per_task": TASK_EXAMPLES["per_task"]}


def checks(result: dict) -> dict:
    best = result["prompt_accuracy"][result["best_router"]]
    routed, base, expert = result["routed_task_acc"], result["base_task_acc"], result["expert_task_acc"]
    general_gaps = {t: 100 * (routed[t] - base[t]) for t in routed if t not in expert}
    domain_gaps = {t: 100 * (routed[t] - expert[t]) for t in expert}
    return {"best_router": result["best_router"], "general_accuracy": best["general"],
            "domain_accuracy": best["domain"],
            "accuracy_passed": min(best["general"], best["domain"]) >= ACCURACY_TARGET,
            "general_task_gap_points": general_gaps, "domain_task_gap_points": domain_gaps,
            "tasks_passed": all(g >= -TASK_TOLERANCE_POINTS for g in [*general_gaps.values(), *domain_gaps.values()]),
            "router_cost_passed": result["router_cost_ratio"] < COST_TARGET}


def print_table(result: dict) -> None:
    formats = [f for f in ("raw", "chat") if f in next(iter(result["prompt_accuracy_detail"].values()))]
    print(f"\n{'router':<12} {'general':>8} {'domain':>8} " + " ".join(f"{f + ' g/d':>15}" for f in formats))
    for kind, acc in result["prompt_accuracy_detail"].items():
        print(f"{kind:<12} {acc['general']:>8.1%} {acc['domain']:>8.1%} "
              + " ".join(f"{acc[f]['general']:>7.1%}/{acc[f]['domain']:<7.1%}" for f in formats))
    print(f"\ntask accuracy (general tasks acc_norm, domain tasks acc) with router '{result['best_router']}' "
          f"(routing cost {result['router_cost_ratio']:.2%} of generating 64 tokens)")
    print(f"{'task':<16} {'routed':>8} {'base':>8} {'expert':>8}")
    for task, acc in result["routed_task_acc"].items():
        expert = result["expert_task_acc"].get(task)
        print(f"{task:<16} {acc:>8.1%} {result['base_task_acc'][task]:>8.1%} "
              f"{'-' if expert is None else f'{expert:.1%}':>8}")
    print("checks:", result["checks"])
