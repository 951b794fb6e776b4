"""The task table as files: tasks.json, tasks.md and tasks.png (each task by its own metric, change vs the base)."""

from __future__ import annotations

import json
from pathlib import Path

from expertkit.fsutil import atomic_write_text, ensure_writable_dir
from expertkit.tasks.run import score, task_metrics


def markdown(card: dict) -> str:
    tasks = sorted({r["task"] for r in card["rows"]})
    names = list(dict.fromkeys(r["composition"] for r in card["rows"]))
    cell = {(r["composition"], r["task"]): r for r in card["rows"]}
    metric = task_metrics(card["rows"])

    def show(name: str, task: str) -> str:
        value, error = score(cell[(name, task)]) if (name, task) in cell else (None, 0.0)
        return "" if value is None else f"{100 * value:.1f} ± {100 * error:.1f}"

    lines = ["| composition | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    lines += [f"| {n} | " + " | ".join(show(n, t) for t in tasks) + " |" for n in names]
    references = card.get("references") or {}  # cards written before references render as before
    if references:
        for key, label in (("chance", "(guessing)"), ("most_frequent", "(always the most frequent answer)")):
            lines.append(f"| {label} | " + " | ".join(
                f"{100 * references[t][key]:.1f}" if t in references else "" for t in tasks) + " |")
    out = "Task accuracy (%, ± lm-eval's standard error; each task by the metric in its header)\n\n"
    out += "\n".join(lines) + "\n"
    for expert, points in card["forgetting"].items():
        out += (f"\n- {expert}: general tasks {points:+.2f} points "
                f"(± {card['forgetting_interval'][expert]:.2f}, 95%)")
        if expert in card["domain_skill"]:
            out += f"; own domain task {card['domain_skill'][expert]:+.2f} points"
    return out + "\n"


def plot(card: dict, path: Path) -> None:
    """Compositions x tasks, coloured by the change vs the base in points (green = better)."""
    from expertkit.plots import heatmap

    tasks = sorted({r["task"] for r in card["rows"]})
    names = list(dict.fromkeys(r["composition"] for r in card["rows"]))
    cell = {(r["composition"], r["task"]): score(r)[0] for r in card["rows"]}
    metric = task_metrics(card["rows"])
    change = [[100 * ((cell.get((n, t)) or 0) - (cell.get(("base", t)) or 0)) for t in tasks] for n in names]
    text = [[None if cell.get((n, t)) is None else 100 * cell[(n, t)] for t in tasks] for n in names]
    references = card.get("references") or {}
    heatmap(path, names, [column_label(t, metric[t], references.get(t)) for t in tasks], change, text,
            ("RdYlGn", -10, 10), "change vs base (points)",
            "task accuracy (text: %, each task's metric; colour: change vs base)")


def column_label(task: str, metric: str, reference: dict | None) -> str:
    """A heatmap column's name, with what guessing and one constant answer score there (as tasks.md's last rows)."""
    label = f"{task}\n({metric})"
    if reference:
        label += f"\nguess {100 * reference['chance']:.1f}\nconstant {100 * reference['most_frequent']:.1f}"
    return label


def write(card: dict, out_dir: Path) -> dict[str, Path]:
    ensure_writable_dir(out_dir, "scorecard folder")
    paths = {"json": out_dir / "tasks.json", "md": out_dir / "tasks.md", "png": out_dir / "tasks.png"}
    atomic_write_text(paths["json"], json.dumps(card, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(card))
    plot(card, paths["png"])
    return paths
