"""What every suite shares: discovering the domains of a data folder, and the cached tiny base + experts.

The base and the expert library are cached under `.expertkit-cache/bench/` (git-ignored), keyed by
the data folder and the recipes, so later suites (merge, route, ...) reuse them instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from expertkit.config import ProjectConfig, config_from_dict
from expertkit.errors import ExpertkitError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "corpora"
CACHE = (ROOT / ".expertkit-cache").resolve() / "bench"  # a linked cache is named by where it lies (result JSONs)
GENERAL = "general"

# The benchmark base: a tiny Llama pretrained mostly on the general corpus.
BASE_BUILD = {
    "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 512, "num_layers": 4, "num_heads": 4,
    "context_length": 256, "steps": 1200, "batch_size": 32, "learning_rate": 3e-3, "warmup_steps": 60,
}
GENERAL_SHARE = 0.9  # the rest is split evenly over the other domains
EXPERT_RECIPE = {
    "rank": 16, "alpha": 32, "learning_rate": 2e-3, "steps": 300, "batch_size": 16, "block_size": 128,
    "replay": 0.25, "checkpoint_every": 100, "warmup_steps": 20,
}
EVALUATION = {"block_size": 128, "batch_size": 16, "max_blocks": 96}


def discover_domains(data: Path) -> list[str]:
    """Every sub-folder with a train split; 'general' must be one of them."""
    if not data.is_dir():
        raise ExpertkitError(f"--data {data} is not a folder")
    names = sorted(d.name for d in data.iterdir() if d.is_dir() and any(d.glob("train.*")))
    if GENERAL not in names:
        raise ExpertkitError(f"--data {data} has no '{GENERAL}' folder with a train split")
    if len(names) < 2:
        raise ExpertkitError(f"--data {data} needs at least one domain folder besides '{GENERAL}'")
    return [GENERAL] + [n for n in names if n != GENERAL]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def bench_config(data: Path, build: dict | None = None, recipe: dict | None = None,
                 exclude: tuple[str, ...] = ()) -> ProjectConfig:
    """The project config of a suite: cached base dir, library dir keyed by recipe (and excluded domains)."""
    domains = discover_domains(data)
    others = [d for d in domains if d != GENERAL]
    build = {**BASE_BUILD, **(build or {})}
    build.setdefault("corpus", {GENERAL: GENERAL_SHARE, **{d: (1 - GENERAL_SHARE) / len(others) for d in others}})
    recipe = {**EXPERT_RECIPE, **(recipe or {})}
    base_dir = CACHE / f"base-{_key(str(data), domains, build)}"
    library_dir = base_dir.parent / f"{base_dir.name}-library-{_key(recipe, exclude)}"
    raw = {
        # A library without some domains reuses the full suite's base (built from every domain), so it
        # carries no build recipe: one naming the excluded domains would not validate.
        "base": {"path": str(base_dir), "build": None if exclude else build},
        # one document per line, as every micro figure so far was measured (the default reads these files,
        # which have no empty lines, as one running text: see the real-model runs)
        "general": {"name": GENERAL, "source": {"path": str(data / GENERAL), "documents": "line"}},
        "domains": [{"name": d, "source": {"path": str(data / d), "documents": "line"}}
                    for d in others if d not in exclude],
        "training": recipe,
        "evaluation": EVALUATION,
        "library": str(library_dir),
    }
    return config_from_dict(raw, origin="benchmark config")


# Real checkpoints (expertkit.models): the domains every real-model suite trains, and their recipe. 180 steps at
# 1e-3 (three times the tokens of the first recipe, 60 steps at 3e-4, at a rate 3.3 times as high) lifts SmolLM2's
# medical gain from 15.5% to 24.4%, code's from 12.4% to 18.7%, news' from 29.2% to 43.3% (the first 32 test
# blocks), with general-task changes of -0.4, +0.7 and -1.2 points (+-2.5, 500 examples per task; README).
REAL_DOMAINS = {"chosen": ("medical", "code", "news")}  # run.py --domains changes it
# replay_loss "kl": the general rows match the base's predictions instead of teaching WikiText's tokenized text;
# on 96 spread blocks the same gains (22.3 / 21.8 / 41.0%) and general-task changes +0.8, +1.5, -0.0 points
# instead of -0.4, +0.7, -1.2 (README, "Real models")
REAL_RECIPE = {
    "rank": 8, "alpha": 16, "learning_rate": 1e-3, "steps": 180, "batch_size": 8, "block_size": 128,
    "replay": 0.25, "replay_loss": "kl", "checkpoint_every": 60, "warmup_steps": 18,
}
# 96 blocks spread over each test split: its first 32 blocks were 4.8% of code's test split, a few files
REAL_EVALUATION = {"block_size": 128, "batch_size": 8, "max_blocks": 96, "sample": "spread"}


def real_config(data: Path, base: str, domains: tuple[str, ...] | None = None,
                recipe: dict | None = None, exclude: tuple[str, ...] = (), model_dir: Path | None = None
                ) -> ProjectConfig:
    """The project config of a suite on a real checkpoint (fetched and imported once per machine), or on the
    model in `model_dir` (a distilled companion, say; `base` then names its library).

    The library is keyed by data and recipe, not by the domain list: a suite that needs one more domain
    trains only that expert. A library without some domains (`exclude`) is a library of its own.
    """
    from expertkit.models import ensure_model

    domains = domains or REAL_DOMAINS["chosen"]
    missing = [d for d in (GENERAL, *domains) if not (data / d).is_dir()]
    if missing:
        raise ExpertkitError(f"--data {data} has no folder(s) {missing}")
    recipe = {**REAL_RECIPE, **(recipe or {})}
    domains = tuple(d for d in domains if d not in exclude)
    library_dir = CACHE / f"{base}-library-{_key(str(data), recipe, *([exclude] if exclude else []))}"
    raw = {  # the files are read the default way: without empty lines, each is one running text
        "base": {"path": str(model_dir or ensure_model(base))},
        "general": {"name": GENERAL, "source": {"path": str(data / GENERAL)}},
        "domains": [{"name": d, "source": {"path": str(data / d)}} for d in domains],
        "training": recipe,
        "evaluation": REAL_EVALUATION,
        "library": str(library_dir),
    }
    return config_from_dict(raw, origin="benchmark config")


def suite_config(data: Path, base: str, domains: tuple[str, ...] | None = None,
                 exclude: tuple[str, ...] = ()) -> ProjectConfig:
    """The config a suite runs on `base`: the micro benchmark base, or a real checkpoint with `domains`."""
    from suites import MICRO

    if base == MICRO:
        return bench_config(data, exclude=exclude)
    return real_config(data, base, domains, exclude=exclude)


def config_experts(cfg: ProjectConfig, library) -> list[str]:
    """The library's experts of `cfg`'s domains: a suite's library is shared, and may hold more (the serve
    suite trains a fourth expert into the real-model library)."""
    from expertkit.library import Kind

    wanted = {d.name for d in cfg.domains}
    return [e.name for e in library.entries(Kind.EXPERT) if e.domain in wanted]


def reuse_experts(source: ProjectConfig, target: ProjectConfig, base) -> None:
    """Copy into `target`'s library the experts `source`'s library already has for `target`'s domains.

    Training is deterministic per recipe, so a library that leaves a domain out need not retrain the others.
    """
    from expertkit.library import Kind, Library

    have, want = Library(source.library), Library(target.library)
    if not have.exists():
        return
    want.create_or_check(base.identity())
    for domain in target.domains:
        if have.has(Kind.EXPERT, domain.name) and not want.has(Kind.EXPERT, domain.name):
            want.copy_entry(have.get(domain.name))


def distilled_companion(data: Path, large: str) -> Path:
    """The small companion `expertkit base distill` makes for a real checkpoint (default recipe), distilled once
    per machine and cached, on the train splits of every corpus in `data` (general text and the domains': a
    companion distilled on WikiText alone knew too little code or medicine for its experts to steer anything)."""
    from expertkit.config import DistillConfig
    from expertkit.distill import distill
    from expertkit.models import ensure_model

    recipe = DistillConfig()
    out = CACHE / f"{large}-companion-{_key(str(data), recipe.model_dump())}"
    if not (out / "config.json").exists():
        distill(str(ensure_model(large)), data, out, recipe)
    return out
