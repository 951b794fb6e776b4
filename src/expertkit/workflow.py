"""The steps the CLI, the demo and the benchmarks share: config -> base -> library -> scorecard."""

from __future__ import annotations

from pathlib import Path

from expertkit.base import Base, load_base
from expertkit.config import ProjectConfig, load_config
from expertkit.errors import ExpertkitError
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


def run_scorecard(cfg: ProjectConfig, base: Base, out: Path | None = None, names: list[str] | None = None) -> dict:
    """Score the base and every library entry on every domain; print and write the report."""
    from expertkit.compose import ExpertPool, build_compositions
    from expertkit.evaluate import markdown_table, score, test_blocks, verdicts, write_report
    from expertkit.library import Library

    library = Library(cfg.library)
    pool = ExpertPool(base, library)
    compositions = build_compositions(pool, names)
    card = score(compositions, test_blocks(cfg, base.tokenizer), cfg.evaluation.batch_size)
    experts = {e.name: e.domain for e in pool.entries if e.kind == "expert"}
    card["verdicts"] = verdicts(card, experts, cfg.general.name if cfg.general else None)
    out = Path(out) if out else Path(cfg.library).parent / "scorecard"
    paths = write_report(card, out)
    console.print(markdown_table(card))
    for line in card["verdicts"]:
        console.print(line, highlight=False)
    console.print(f"scorecard written to {paths['json']}, {paths['md']}, {paths['png']}")
    card["paths"] = {k: str(v) for k, v in paths.items()}
    return card
