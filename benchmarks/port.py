"""Suite `port`: carry an expert library to an updated base, and measure what each way of carrying keeps.

The "update" is the benchmark base (micro, or SmolLM2-135M) trained further, every weight, on more general
text (the general and literature train splits; literature has no expert here). Experts for medical, news and
code are then: ported (training-free), refreshed (20% of their original steps, from the ported weights, with
replay), refreshed compatibly (the same steps, plus the MUSCLE terms: on tokens, and on the answers to the
validation questions of the domain's labeled task), and retrained from scratch on the new base (their full
recipe), all measured on the new base.

Acceptance: ported experts keep >= 70% of the retrained experts' perplexity gain over the new base; the
refresh keeps >= 95%; the compatible refresh has >= 30% fewer negative flips than the plain refresh (on
the domain's labeled task's test questions, against the old expert) with accuracy no more than 0.5 point
lower. Flips are also counted token by token on each domain's test text (the old expert's top-1 guess right,
the new one's wrong): every domain has that, and it is what the compatible term's token part trains on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common import CACHE, GENERAL, REAL_DOMAINS, _key, reuse_experts, suite_config
from suites import MICRO, PORT_OPTIONS, TASK_EXAMPLES, suite

PORT_DOMAINS = ("medical", "news", "code")  # micro; a real base takes run.py --domains (the same three by default)
UPDATE_TEXT = {GENERAL: 0.5, "literature": 0.5}  # "more general text": the corpus mix of the update
# The continued pretraining that makes the new base, every weight, in two strengths (run.py --update).
# "strong": micro at a tenth of its own peak pretraining learning rate (3e-3) for a third of its steps; SmolLM2 at
# the same rate, 3e-4, for what 2 CPU cores allow (120 steps of 8 x 128 tokens); that is not a tenth of
# SmolLM2's own peak (its exact value was not checked here; a third-party summary of the paper gives 5e-4 for the
# 1.7B model). It moves either base far: own-domain perplexity rises 11-83%, a shift toward the update's text.
# "mild": the same steps and text at a tenth of that rate, 3e-5, nearer a point release (README, `port`).
_RECIPES = {
    MICRO: {"steps": 400, "warmup_steps": 20, "batch_size": 32, "block_size": 256},
    "smollm2-135m": {"steps": 120, "warmup_steps": 12, "batch_size": 8, "block_size": 128},
}
UPDATE_RATES = {"strong": 3e-4, "mild": 3e-5}  # run.py --update names one
UPDATES = {base: {name: {**recipe, "learning_rate": rate} for name, rate in UPDATE_RATES.items()}
           for base, recipe in _RECIPES.items()}
REFRESH_SHARE = 0.2  # refresh steps as a share of the experts' original steps
GOALS = {"ported_recovery": 0.70, "refreshed_recovery": 0.95, "flip_cut": 0.30, "accuracy_drop_points": 0.5}


@suite("port", bases=tuple(UPDATES))
def run(data: Path, device: str | None, base: str = MICRO) -> dict:
    from expertkit.base import load_base
    from expertkit.config import PortOptions
    from expertkit.library import Library
    from expertkit.porting import port_library
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    full_cfg, old_base = load_project_base(suite_config(data, base), device)  # builds the micro base if needed
    domains = PORT_DOMAINS if base == MICRO else REAL_DOMAINS["chosen"]
    cfg = suite_config(data, base, domains=domains,
                       exclude=tuple(d.name for d in full_cfg.domains if d.name not in domains))
    cfg = cfg.model_copy(update={"library": cfg.library + "-experts"})  # experts only: no merges or routers
    reuse_experts(full_cfg, cfg, old_base)
    train_all(cfg, old_base)
    update = UPDATES[base][PORT_OPTIONS["update"]]
    new_dir = updated_base(cfg, update, device)
    new_cfg = cfg.model_copy(update={"base": cfg.base.model_copy(update={"path": str(new_dir), "build": None}),
                                     "library": str(new_dir) + "-library-" + _key(cfg.training.model_dump())})
    new_cfg, new_base = load_project_base(new_cfg, device)
    train_all(new_cfg, new_base)  # retrained from scratch: the reference (cached)
    steps = max(1, round(REFRESH_SHARE * cfg.training.steps))
    reports, measured = {}, {}  # one memo: the old and ported experts, bases and retrained ones measured once
    for name, compatible in (("refreshed", False), ("compatible", True)):
        out = Path(str(new_dir) + f"-port-{name}")
        shutil.rmtree(out, ignore_errors=True)
        options = PortOptions(refresh=steps, compatible=compatible, task_examples=TASK_EXAMPLES["per_task"])
        reports[name] = port_library(Library(cfg.library), load_base(str(new_dir), device), out, options, cfg,
                                     retrained=Library(new_cfg.library), measured=measured)
    return summarize(reports, base, update, steps, cfg.training.steps)


def updated_base(cfg, update: dict, device) -> Path:
    """The base of `cfg` trained `update["steps"]` more steps on UPDATE_TEXT, every weight (cached by recipe)."""
    import torch

    from expertkit.base import load_base
    from expertkit.build import pretrain
    from expertkit.config import DomainConfig
    from expertkit.data import TrainingStream, load_corpus, make_blocks
    from expertkit.fsutil import atomic_dir

    data = Path(cfg.general.source.path).parent
    out = CACHE / f"{Path(cfg.base.path).name}-update-{_key(str(data), UPDATE_TEXT, update)}"
    if (out / "config.json").is_file():
        return out
    old_base = load_base(cfg.base.path, device)
    mix = []
    for name, share in UPDATE_TEXT.items():
        corpus = load_corpus(DomainConfig.model_validate({"name": name, "source": {**cfg.general.source.model_dump(),
                                                                                   "path": str(data / name)}}))
        mix.append((make_blocks(old_base.tokenizer, corpus, "train", update["block_size"]), share))
    torch.manual_seed(1)
    model = old_base.model
    pretrain(model, TrainingStream(mix, update["batch_size"], seed=1), update["steps"], update["learning_rate"],
             update["warmup_steps"], old_base.device, "updating the base")
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        old_base.tokenizer.save_pretrained(tmp)
    return out


def summarize(reports: dict, base: str, update: dict, steps: int, original_steps: int) -> dict:
    """The acceptance table: per expert, perplexities, recoveries, flips and accuracies of both refreshes."""
    plain, compatible = reports["refreshed"]["experts"], reports["compatible"]["experts"]
    experts = {}
    print(f"\n{'expert':<9} {'new base':>9} {'ported':>8} {'refresh':>8} {'compat':>8} {'retrain':>8} "
          f"{'ported kept':>11} {'refresh kept':>12} {'neg flips r/c':>14} {'token r/c':>12} {'acc old/r/c':>16}"
          "  verdict")
    for name, row in plain.items():
        other = compatible[name]
        record = {"domain": row["domain"], "task": row["task"], "new_base_ppl": row["new_base_ppl"],
                  "ported_ppl": row["ported_ppl"], "refreshed_ppl": row["refreshed_ppl"],
                  "compatible_ppl": other["refreshed_ppl"], "retrained_ppl": row["retrained_ppl"],
                  "ported_recovery": row["ported_recovery"], "refreshed_recovery": row["refreshed_recovery"],
                  "compatible_recovery": other["refreshed_recovery"], "old_acc": row.get("old_acc"),
                  "ported_acc": row.get("ported_acc"), "refreshed_acc": row.get("refreshed_acc"),
                  "compatible_acc": other.get("refreshed_acc"),
                  "ported_negative_flips": row.get("ported_negative_flips"),
                  "refreshed_negative_flips": row.get("refreshed_negative_flips"),
                  "compatible_negative_flips": other.get("refreshed_negative_flips"),
                  "positive_flips": row.get("refreshed_positive_flips"),
                  "compatible_positive_flips": other.get("refreshed_positive_flips"),
                  "refreshed_token_negative_flips": row["refreshed_token_negative_flips"],
                  "compatible_token_negative_flips": other["refreshed_token_negative_flips"],
                  "ported_token_negative_flips": row["ported_token_negative_flips"],
                  "verdict": row["verdict"]}
        experts[name] = record
        print(f"{name:<9} {record['new_base_ppl']:>9.2f} {record['ported_ppl']:>8.2f} {record['refreshed_ppl']:>8.2f} "
              f"{record['compatible_ppl']:>8.2f} {record['retrained_ppl']:>8.2f} {record['ported_recovery']:>11.1%} "
              f"{record['refreshed_recovery']:>12.1%} "
              f"{_pair(record, 'refreshed_negative_flips', 'compatible_negative_flips'):>14} "
              f"{_pair(record, 'refreshed_token_negative_flips', 'compatible_token_negative_flips'):>12} "
              f"{_acc(record):>16}  {record['verdict']}")
    checks = acceptance(experts)
    for check, value in checks.items():
        print(f"{check}: {value}")
    return {"base_model": base, "update": {"name": PORT_OPTIONS["update"], **update, "text": UPDATE_TEXT},
            "refresh_steps": steps, "original_steps": original_steps, "experts": experts, "checks": checks,
            "goals": GOALS, "reports": reports}


def acceptance(experts: dict) -> dict:
    with_task = [r for r in experts.values() if r["refreshed_negative_flips"] is not None]
    ported = [r["ported_recovery"] for r in experts.values()]
    refreshed = [r["refreshed_recovery"] for r in experts.values()]
    checks = {"min_ported_recovery": min(ported), "min_refreshed_recovery": min(refreshed),
              "ported_passed": min(ported) >= GOALS["ported_recovery"],
              "refreshed_passed": min(refreshed) >= GOALS["refreshed_recovery"]}
    plain_tokens = sum(r["refreshed_token_negative_flips"] for r in experts.values())
    compatible_tokens = sum(r["compatible_token_negative_flips"] for r in experts.values())
    checks["token_negative_flip_cut"] = 1 - compatible_tokens / plain_tokens if plain_tokens else None
    if with_task:
        plain = sum(r["refreshed_negative_flips"] for r in with_task) / len(with_task)
        compatible = sum(r["compatible_negative_flips"] for r in with_task) / len(with_task)
        drop = 100 * sum(r["refreshed_acc"] - r["compatible_acc"] for r in with_task) / len(with_task)
        cut = 1 - compatible / plain if plain else None
        checks.update(mean_refreshed_negative_flips=plain, mean_compatible_negative_flips=compatible,
                      negative_flip_cut=cut, compatible_accuracy_drop_points=drop,
                      compatible_passed=cut is not None and cut >= GOALS["flip_cut"]
                      and drop <= GOALS["accuracy_drop_points"])
    return checks


def _pair(record: dict, a: str, b: str) -> str:
    if record[a] is None:
        return "-"
    return f"{record[a]:.1%}/{record[b]:.1%}"


def _acc(record: dict) -> str:
    if record["old_acc"] is None:
        return "-"
    return f"{record['old_acc']:.1%}/{record['refreshed_acc']:.1%}/{record['compatible_acc']:.1%}"
