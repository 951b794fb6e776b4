"""The steps the CLI, the demo and the benchmarks share: config -> base -> library -> scorecard."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from expertkit.base import Base, BaseSpec, load_base
from expertkit.config import ProjectConfig, load_config
from expertkit.errors import ExpertkitError
from expertkit.executors import Context, Executor, LocalExecutor
from expertkit.library import BASE, Kind
from expertkit.progress import console


def load_project_base(config_path: Path | ProjectConfig, device: str | None = None,
                      build_missing: bool = True) -> tuple[ProjectConfig, Base]:
    """Load the config and its base, building the tiny base first if the config describes one."""
    cfg = load_config(config_path) if not isinstance(config_path, ProjectConfig) else config_path
    if cfg.base.build is not None and not (Path(cfg.base.path) / "config.json").exists():
        if not build_missing:
            raise ExpertkitError(f"base {cfg.base.path} is not built yet; run `expertkit base build` first")
        from expertkit.build import build_base

        build_base(cfg, device=device)
    return cfg, load_base(cfg.base.path, device)


def run_scorecard(cfg: ProjectConfig, base: Base, out: Path | None = None, names: list[str] | None = None,
                  executor: Executor | None = None, small: Path | None = None,
                  token_map: str | None = None) -> dict:
    """Score the base and every library entry on every domain; print and write the report.

    With `small` (a small model's project YAML or library), its collaborations with this base are
    scored too (`token_map`: how they align two vocabularies). The composition x domain cells are jobs of
    `executor` (default: here, one after another).
    """
    from expertkit.compose.catalog import require_small
    from expertkit.evaluate import markdown_table, score_on, test_blocks, verdicts, write_report
    from expertkit.library import Library

    library = Library(Path(cfg.library).resolve())
    entries = library.entries()
    if names is None:
        names = [BASE, *(e.name for e in entries)] + (_small_offers(small) if small else [])
    elif not small:
        require_small(names)
    executor = executor or LocalExecutor()
    executor.check_shared({"library": library.root, "base model": Path(base.name),
                           **({"small model": Path(small)} if small else {})})
    readings: dict[str, str] = {}
    blocks = test_blocks(cfg, base.tokenizer, readings)
    ev = cfg.evaluation
    context = Context(partial(library_score_state, BaseSpec.of(base), str(library.root), names, blocks,
                              ev.batch_size, ev.context_tokens, str(small) if small else None, token_map))
    card = score_on(executor, context, names, blocks, ev.batch_size)
    card["context_tokens"], card["readings"] = ev.context_tokens, readings
    experts = {e.name: e.domain for e in entries if e.kind == Kind.EXPERT}
    card["verdicts"] = verdicts(card, experts, cfg.general.name if cfg.general else None)
    out = Path(out) if out else Path(cfg.library).parent / "scorecard"
    paths = write_report(card, out)
    console.print(markdown_table(card))
    for line in card["verdicts"]:
        console.print(line, highlight=False)
    console.print(f"scorecard written to {paths['json']}, {paths['md']}, {paths['png']}")
    card["paths"] = {k: str(v) for k, v in paths.items()}
    return card


def run_task_scorecard(cfg: ProjectConfig, base: Base, tasks: list[str], out: Path | None = None,
                       names: list[str] | None = None, limit: int | None = None,
                       data_root: Path | None = None) -> dict:
    """Every composition (the base and every library entry, or `names`) on lm-eval tasks; write the task table."""
    from expertkit.compose import build_compositions
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool
    from expertkit.tasks import report
    from expertkit.tasks.local import default_data_root, reference_scores, resolve
    from expertkit.tasks.run import composition_identity, evaluate_on_tasks, summarize

    specs = resolve(tasks, data_root or default_data_root())
    library = Library(Path(cfg.library).resolve())
    entries = {e.name: e for e in library.entries()}
    names = [BASE, *entries] if names is None else names
    identity = base.identity()  # before adapters are attached
    pool = ExpertPool(base, library, names=[n for n in names if n in entries])
    compositions = {c.name: (c, composition_identity(identity, entries[c.name].manifest if c.name in entries
                                                      else None)) for c in build_compositions(pool, names)}
    out = Path(out) if out else Path(cfg.library).parent / "scorecard"
    rows = evaluate_on_tasks(compositions, base.tokenizer, pool.context_length or 2048, specs, limit,
                             cfg.evaluation.batch_size, cache_dir=out / "task-cache")
    experts = {n: e.domain for n, e in entries.items() if e.kind == Kind.EXPERT and n in names}
    card = {"rows": rows, **summarize(rows, experts), "limit": limit, "references": reference_scores(specs, limit)}
    paths = report.write(card, out)
    console.print(report.markdown(card), highlight=False)
    console.print(f"task table written to {paths['json']}, {paths['md']}, {paths['png']}")
    return card


def library_score_state(spec: BaseSpec, library_root: str, names: list[str], blocks: dict, batch_size: int,
                        context_tokens: int = 0, small: str | None = None, token_map: str | None = None):
    """A worker's scorecard state: the base with the library attached and the named compositions built."""
    from expertkit.compose import build_compositions
    from expertkit.compose.collaborate import load_small_pool
    from expertkit.evaluate import ScoreState
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool

    library = Library(library_root)
    # with small experts to steer it, a large model needs no library of its own
    pool = ExpertPool(spec.load(), library if library.exists() or not small else None)
    small_pool = load_small_pool(small, spec.device) if small else None
    compositions = build_compositions(pool, names, small=small_pool, token_map=token_map)
    return ScoreState({c.name: c for c in compositions}, blocks, batch_size, context_tokens)


def _small_offers(small: Path) -> list[str]:
    """The collaboration specs a small model's experts offer (read from its library; no model is loaded)."""
    from expertkit.compose.collaborate import collaboration_names, small_library

    return collaboration_names([e.name for e in small_library(small).entries() if e.is_adapter])


def library_trial_state(spec: BaseSpec, library_root: str, experts: list[str], valid: dict, batch_size: int):
    """A worker's merge-search state: the experts attached and their ΔW read once."""
    from expertkit.library import Library
    from expertkit.merging.search import trial_state
    from expertkit.runtime import ExpertPool

    return trial_state(ExpertPool(spec.load(), Library(library_root), names=experts), experts, valid, batch_size)


def expert_names(pool, requested: list[str] | None) -> list[str]:
    """The experts to merge: the requested ones, or every expert (not merges) in the library."""
    names = list(requested) if requested else [e.name for e in pool.entries if e.kind == Kind.EXPERT]
    if not names:
        raise ExpertkitError("no experts to merge: the library has none and --expert named none")
    return names


def validation_blocks(cfg: ProjectConfig, tokenizer, domains: list[str], max_blocks: int = 16) -> dict:
    """Validation blocks of the given domains (and the general one) for recipe search."""
    from expertkit.data import load_corpus, make_blocks

    names = ([cfg.general.name] if cfg.general else []) + [d for d in domains if not cfg.general or d != cfg.general.name]
    out = {}
    for name in names:
        domain = cfg.domain(name)
        corpus = load_corpus(domain)
        if not corpus.splits["valid"]:
            raise ExpertkitError(f"domain '{name}' has no validation split; merge --search scores recipes on it")
        out[name] = make_blocks(tokenizer, corpus, "valid", cfg.evaluation.block_size, domain.task).take(
            slice(0, max_blocks))
    return out


def run_merge_search(cfg: ProjectConfig, base: Base, experts: list[str] | None, name: str, budget_seconds: float,
                     output: str = "adapter", seed: int = 0, overwrite: bool = False,
                     executor: Executor | None = None, **storage) -> dict:
    """Search a recipe on validation data (trials are jobs of `executor`), write the best one, print the trials.

    Trials rank exact merges, so the best is stored as close as the recipe's bound asks (`storage`: rank or
    max_error, as in MergeRecipe), not re-factored at some fixed rank.
    """
    from expertkit.library import Library
    from expertkit.merging import describe_storage, make_recipe, merge_experts
    from expertkit.merging.search import search
    from expertkit.runtime import ExpertPool

    library = Library(Path(cfg.library).resolve())
    pool = ExpertPool(base, library)
    names = expert_names(pool, experts)
    chosen = [e for e in pool.entries if e.name in names and e.domain]
    domains = [e.domain for e in chosen]
    known = {d.name for d in cfg.all_domains()}
    unlisted = {e.name: e.domain for e in chosen if e.domain not in known}
    if unlisted:
        raise ExpertkitError(f"merge --search scores each expert's domain on its validation split, and the project "
                             f"config lists no domain for expert(s) {unlisted} (expert: domain); add the domain(s) "
                             f"to the config, or choose the experts to merge with --expert")
    valid = validation_blocks(cfg, base.tokenizer, domains)
    executor = executor or LocalExecutor()
    executor.check_shared({"library": library.root, "base model": Path(base.name)})
    context = Context(partial(library_trial_state, BaseSpec.of(base), str(library.root), names, valid,
                              cfg.evaluation.batch_size))
    console.print(f"searching merge recipes for {names} on validation data ({budget_seconds:.0f}s budget)")
    result = search(names, context, budget_seconds, seed, executor)
    merged = {k: v for k, v in result.best.recipe.describe().items() if k not in ("rank", "max_error", "output")}
    best = make_recipe(**merged, output=output, **{k: v for k, v in storage.items() if v is not None})
    info = {"search": {"validation_ppl": result.best.ppl, "score": result.best.score, "trials": len(result.trials),
                       "seconds": round(result.seconds, 1), "base_validation_ppl": result.base_ppl,
                       "worse_than_base_on": list(result.best.regressions)}}
    entry, report = merge_experts(pool, library, best, name, overwrite=overwrite, extra_manifest=info)
    console.print(f"best recipe: {best.describe()}\nvalidation perplexity (base): " + ", ".join(
        f"{d} {p:.2f} ({result.base_ppl[d]:.2f})" for d, p in result.best.ppl.items()), highlight=False)
    if result.best.regressions:
        console.print(f"warning: none of the {len(result.trials)} recipes tried kept every domain at the base's "
                      f"level; the best is worse than the base on {', '.join(result.best.regressions)} (a longer "
                      f"--budget tries more)", highlight=False)
    console.print(describe_storage(report, report["modules"]), highlight=False)
    console.print(f"written to {entry.path}")
    return {"recipe": best.describe(), "validation_ppl": result.best.ppl, "base_validation_ppl": result.base_ppl,
            "worse_than_base_on": list(result.best.regressions), "trials": len(result.trials),
            "seconds": result.seconds, "entry": entry.name, "report": {k: v for k, v in report.items()
                                                                       if k != "relative_error"}}


def run_router_train(cfg: ProjectConfig, base: Base, kind: str, name: str, abstain_rate: float | None = None,
                     overwrite: bool = False):
    """Train, calibrate and save a router in the library; print what it learned."""
    from expertkit.library import Library
    from expertkit.routing import save_router, train_router
    from expertkit.runtime import ExpertPool

    library = Library(cfg.library)
    pool = ExpertPool(base, library, names=[e.name for e in library.entries(Kind.EXPERT)])
    calibrated, report = train_router(cfg, pool, kind, name, abstain_rate)
    entry = save_router(library, calibrated, report, overwrite=overwrite)
    valid = report["validation"]
    console.print(f"router '{name}' ({kind}) over {calibrated.router.labels}: fitted in {report['fit_seconds']}s; "
                  f"abstain below {calibrated.threshold:.3f} (target {report['abstain_rate']:.0%} of in-library "
                  f"validation prompts, got {valid['abstain_rate']:.1%}); validation accuracy {valid['accuracy']:.1%}",
                  highlight=False)
    if "prompt_validation" in report:
        held = report["prompt_validation"]
        console.print(f"on {held['n']} held-out prompts (routing.prompts): accuracy {held['accuracy']:.1%} ("
                      + ", ".join(f"{label} {acc:.1%}" for label, acc in held["by_label"].items()) + ")",
                      highlight=False)
    console.print(f"written to {entry.path}")
    return entry


def route_text(cfg: ProjectConfig, base: Base, text: str, router: str | None = None):
    """Route one prompt with a library router; returns the Routing (choice + probabilities)."""
    from expertkit.library import Library
    from expertkit.routing import Prompts, find_router, load_router
    from expertkit.runtime import ExpertPool

    library = Library(cfg.library)
    calibrated = load_router(library, find_router(library, router))
    pool = ExpertPool(base, library, names=calibrated.experts)
    return calibrated, calibrated.route(pool, Prompts.from_texts(base.tokenizer, [text]))


def run_port(source: Path, to: str, out: Path, options, retrained: Path | None = None,
             tasks_data: Path | None = None, device: str | None = None) -> dict:
    """`expertkit port`: `source` is a project YAML (its library, and its data for refresh and report) or a
    library folder (training-free port only)."""
    from expertkit.library import Library
    from expertkit.porting import port_library

    cfg = None
    if source.is_file():
        cfg = load_config(source)
        library = Library(Path(cfg.library).resolve())
    elif source.is_dir():
        library = Library(source)
    else:
        raise ExpertkitError(f"{source}: no such project YAML or library folder")
    library.index()  # a folder that is no library is refused before any model loads
    new_base = load_base(to, device)
    return port_library(library, new_base, Path(out), options, cfg, Library(retrained) if retrained else None,
                        tasks_data)


def run_federated(cfg: ProjectConfig, base: Base, only: list[str] | None = None, force: bool = False,
                  engine: str = "flower") -> list:
    """Train each domain that lists silos across them (`only`: just these), skipping finished experts."""
    from expertkit.federated import ENGINES, train_federated
    from expertkit.library import Library

    if engine not in ENGINES:
        raise ExpertkitError(f"unknown --engine '{engine}'; known: {', '.join(ENGINES)}")
    federated = [d for d in cfg.domains if d.silos]
    if not federated:
        raise ExpertkitError("no domain lists silos: give a domain 'silos: [{name, source}, ...]' to train it "
                             "federated")
    unknown = sorted(set(only or []) - {d.name for d in federated})
    if unknown:
        raise ExpertkitError(f"--only names domains without silos {unknown}; domains with silos: "
                             f"{[d.name for d in federated]}")
    library = Library(Path(cfg.library).resolve())
    entries = []
    for d in federated:
        if only and d.name not in only:
            continue
        if library.has(Kind.EXPERT, d.name) and not force:
            console.print(f"expert '{d.name}' already in the library: skipped (pass --force to retrain)")
            continue
        entries.append(train_federated(cfg, base, d.name, engine=engine, overwrite=force))
    return entries
