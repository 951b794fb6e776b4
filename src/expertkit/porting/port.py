"""`expertkit port`: carry an expert library to an updated base, and say which experts survive the move.

1. Check the new base against the library's base (porting.checks); nothing is written on a refusal.
2. Training-free port (PortLLM): each expert's adapter, unchanged, becomes an entry of a new library on
   the new base, with its provenance. Mixtures (specs naming experts) are carried the same way.
3. `--refresh STEPS`: each ported expert trains on for STEPS steps on the new base, from its ported
   weights, with replay, on the batches after those it was trained on; `--compatible` adds the MUSCLE term
   (porting.compatible_loss), on tokens and, where the domain has a labeled task, on its validation answers.
4. What depends on the base is re-made, not copied: merges from the new experts with their recipes,
   routers retrained and re-calibrated on the new base (their features and abstain threshold are the base's).
5. The port report (porting.report), when the project YAML gives the data to measure on.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from expertkit.base import Base, BaseSpec
from expertkit.config import PortOptions, ProjectConfig, TrainConfig
from expertkit.data import load_corpus, make_blocks
from expertkit.errors import ExpertkitError
from expertkit.executors import Context, Job, LocalExecutor
from expertkit.library import Entry, Kind, Library
from expertkit.porting.checks import check_new_base
from expertkit.porting.compatible_loss import CompatibleLoss
from expertkit.porting.report import Measurer, expert_summary, write
from expertkit.porting.task_term import validation_choices
from expertkit.progress import console

TRAINING_FREE = "training-free (PortLLM): the expert's ΔW unchanged on the new base"
CARRIED_KINDS = (Kind.EXPERT, Kind.MIXTURE)  # copied as they are; merges and routers are re-made


def port_library(old_library: Library, new_base: Base, out: Path, options: PortOptions,
                 cfg: ProjectConfig | None = None, retrained: Library | None = None,
                 tasks_data: Path | None = None, measured: dict | None = None) -> dict:
    """Carry `old_library` to `new_base` as a new library at `out`; returns the report (empty without `cfg`).

    `measured`: a memo (report.Measurer.memo) shared by calls that port the same library, so what they have in
    common (the old and ported experts, the bases, the retrained reference) is measured once."""
    # 1. every check, and all data read, before anything is written
    _check_out(out)
    old_identity = old_library.base_identity()
    old_spec = BaseSpec(old_identity["name"], old_identity)
    entries = old_library.entries()
    check_new_base(old_spec.load_private(), new_base, [e for e in entries if e.is_adapter])
    experts = {e.name: e for e in entries if e.kind == Kind.EXPERT}
    if not experts:
        raise ExpertkitError(f"library {old_library.root} has no experts to port")
    if cfg is None and (options.refresh or retrained is not None):
        raise ExpertkitError("--refresh and --retrained need the project YAML (its data), not a library folder: "
                             "pass the YAML whose library this is")
    if retrained is not None:
        retrained.check_base(new_base.identity(), what=f"--retrained library {retrained.root}")
    library = Library(out)  # nothing on disk until create_or_check below
    refresh = (_refresh_jobs(experts, cfg, new_base, options, old_spec, library, tasks_data) if options.refresh
               else [])
    measurer = (Measurer(cfg, {n: e.domain for n, e in experts.items()}, options.task_examples, tasks_data,
                         memo=measured if measured is not None else {})
                if cfg is not None else None)

    # 2. the training-free port
    library.create_or_check(new_base.identity())
    provenance = {"from_base": old_identity, "from_library": str(old_library.root), "method": TRAINING_FREE}
    for entry in entries:
        if entry.kind in CARRIED_KINDS:
            library.port_entry(entry, provenance)
    console.print(f"ported {len(experts)} experts to {new_base.name} (training-free) -> {out}", highlight=False)
    new_spec = BaseSpec.of(new_base)
    if measurer:
        measurer.measure(old_spec, old_library, "old", base_stage="old_base")
        measurer.measure(new_spec, library, "ported", base_stage="new_base")
    if refresh:  # 3.
        _refresh(refresh, new_base, library, options, provenance)
        if measurer:
            measurer.measure(new_spec, library, "refreshed")
    if measurer and retrained is not None:
        measurer.measure(new_spec, retrained, "retrained")
    other = _remake_dependents(entries, library, new_spec, cfg)  # 4.
    if measurer is None:
        console.print("no port report: pass the project YAML (not the library folder) to measure the port")
        return {}
    # 5. the report
    report = {"from_library": str(old_library.root), "from_base": old_identity, "to_base": new_base.identity(),
              "refresh": _describe_refresh(options), "options": options.model_dump(),
              "experts": {name: expert_summary(record, options) for name, record in measurer.records.items()},
              "other_entries": other}
    paths = write(report, out)
    console.print(paths["md"].read_text(encoding="utf-8"), highlight=False)
    console.print(f"port report written to {paths['json']}, {paths['md']}")
    return report


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExpertkitError(f"--out {out} already exists; the port writes a new library: pick a new folder "
                             "or remove that one")


def _describe_refresh(options: PortOptions) -> str:
    if not options.refresh:
        return "none (training-free port)"
    how = f"compatible (MUSCLE, KL weight {options.compatible_weight})" if options.compatible else "plain"
    return f"{options.refresh} steps, {how}, with replay"


# ---------------------------------------------------------------- refresh


def _refresh_jobs(experts: dict[str, Entry], cfg: ProjectConfig, new_base: Base, options: PortOptions,
                  old_spec: BaseSpec, library: Library, tasks_data: Path | None) -> list[tuple]:
    """(name, training job, replay blocks) per expert, the data read now: bad data fails before anything is written."""
    from expertkit.train import expert_job

    missing = {name: e.domain for name, e in experts.items() if e.domain not in {d.name for d in cfg.domains}}
    if missing:
        raise ExpertkitError(f"experts {missing} were trained on domains the project YAML does not list; add them "
                             "so --refresh can read their text")
    general_blocks: dict[int, object] = {}  # block size -> the general corpus packed at that size
    jobs = []
    for name, entry in experts.items():
        recipe = refresh_recipe(entry, cfg.training, options.refresh)
        if recipe.proxy_for:
            raise ExpertkitError(f"expert '{name}' was trained through a proxy on {recipe.proxy_for}; --refresh does "
                                 "not carry that training to a new base yet: port it without --refresh, or retrain it")
        job = expert_job(cfg.domain(entry.domain), new_base.tokenizer, recipe, library)
        loss = _compatible_loss(entry, new_base, options, old_spec, tasks_data, recipe.seed)
        general = None
        if recipe.replay > 0:
            if cfg.general is None:
                raise ExpertkitError(f"expert '{name}' was trained with replay {recipe.replay}, and the project YAML "
                                     "has no 'general' corpus to replay; add one")
            if recipe.block_size not in general_blocks:
                general_blocks[recipe.block_size] = make_blocks(new_base.tokenizer, load_corpus(cfg.general), "train",
                                                                recipe.block_size)
            general = general_blocks[recipe.block_size]
        jobs.append((name, dataclasses.replace(job, start_from=str(entry.path), loss=loss,
                                               first_batch=batches_read(entry)), general))
    return jobs


def _compatible_loss(entry: Entry, new_base: Base, options: PortOptions, old_spec: BaseSpec,
                     tasks_data: Path | None, seed: int) -> CompatibleLoss | None:
    """The MUSCLE loss of a --compatible refresh (None for a plain one), with the validation questions of the
    expert's domain task when it has one and options.compatible_task is on."""
    if not options.compatible:
        return None
    task, choices = None, []
    if options.compatible_task:
        task, choices = validation_choices(entry.domain, new_base.tokenizer, new_base.context_length or 2048,
                                           tasks_data)
        if task is None or not choices:
            console.print(f"compatible refresh of '{entry.name}': no labeled validation questions for its domain "
                          f"'{entry.domain}' (tokens only)", highlight=False)
    return CompatibleLoss(old_spec.path, old_spec.identity, str(entry.path), options.compatible_weight, task,
                          tuple(choices), seed)


def batches_read(entry: Entry) -> int:
    """How far into its data stream an expert's training went (a refreshed one: its own refresh included).

    A refresh starts there, so its steps read text the expert has not been trained on yet rather than the
    first batches of its own training again: an expert trained on fewer rows than its domain has blocks has
    not seen most of its text.
    """
    return int(entry.manifest.get("first_batch", 0)) + int(entry.manifest.get("steps", 0))


def refresh_recipe(entry: Entry, default: TrainConfig, steps: int) -> TrainConfig:
    """The expert's own recipe (the project's when its manifest has none), shortened to `steps` steps."""
    recipe = TrainConfig.model_validate(entry.manifest["recipe"]) if "recipe" in entry.manifest else default
    return recipe.model_copy(update={"steps": steps, "warmup_steps": min(recipe.warmup_steps, steps // 10),
                                     "checkpoint_every": min(recipe.checkpoint_every, steps)})


def _refresh(jobs: list[tuple], new_base: Base, library: Library, options: PortOptions, provenance: dict) -> None:
    """Train every job on the bare new base and write each refreshed expert over its ported entry."""
    from expertkit.train import add_expert, train_expert_job, train_state

    how = {**provenance, "method": f"refreshed: {_describe_refresh(options)}"}
    for name, job, general in jobs:
        def finished(done: Job, result: dict, name: str = name) -> None:
            add_expert(library, name, {**result, "manifest": {**result["manifest"], "ported": how}}, overwrite=True)

        LocalExecutor().map(train_expert_job, [Job(f"refresh {name}", job, total=job.recipe.steps)],
                            Context(partial(train_state, BaseSpec.of(new_base), general)), on_result=finished)


# ---------------------------------------------------------------- what depends on the base


def _remake_dependents(entries: list[Entry], library: Library, new_spec: BaseSpec,
                       cfg: ProjectConfig | None) -> dict[str, str]:
    """Re-make merges from the library's (ported) experts and retrain routers on the new base; what was done."""
    from expertkit.merging import make_recipe, merge_experts
    from expertkit.routing import save_router, train_router
    from expertkit.runtime import ExpertPool

    merges = [e for e in entries if e.kind in (Kind.MERGE, Kind.MERGED_MODEL)]
    routers = [e for e in entries if e.kind == Kind.ROUTER]
    done: dict[str, str] = {}
    if not merges and not routers:
        return done
    pool = ExpertPool(new_spec.load_private(), library, names=[e.name for e in library.entries(Kind.EXPERT)])
    for entry in merges:
        recipe = make_recipe(**entry.manifest["parameters"])
        merge_experts(pool, library, recipe, entry.name, extra_manifest={"ported": {"method": "re-made from the "
                                                                                    "ported experts"}})
        done[f"{entry.kind} '{entry.name}'"] = f"re-made ({recipe.method}) from the ported experts"
    for entry in routers:
        if cfg is None:
            done[f"router '{entry.name}'"] = ("not carried: its features and abstain threshold belong to the old "
                                              "base; pass the project YAML to retrain it on the new one")
            continue
        calibrated, report = train_router(cfg, pool, entry.manifest["router_kind"], entry.name,
                                          entry.manifest.get("abstain_rate"))
        save_router(library, calibrated, {**report, "ported": {"method": "retrained on the new base"}})
        done[f"router '{entry.name}'"] = (f"retrained ({entry.manifest['router_kind']}) and re-calibrated on the new "
                                          f"base: validation accuracy {report['validation']['accuracy']:.1%}")
    for what, note in done.items():
        console.print(f"{what}: {note}", highlight=False)
    return done
