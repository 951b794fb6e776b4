"""The port report: for every expert, what carrying it to the new base keeps, and a verdict.

Per expert: perplexity on its own domain's test split of the new base, the ported expert (its old ΔW on
the new base), the refreshed one and, when given, one retrained from scratch; on the domain's labeled
task, accuracy and the flips against the old expert (negative: it was right, the new one is wrong;
positive: the reverse), as fractions of the task's test examples (a compatible refresh trains on its
validation ones); and the same flips token by token on the test text (the old expert's top-1 guess right,
the new one's wrong), which every domain has.

Recovery is the share of the reference gain kept: (new base ppl - ppl) / (new base ppl - reference ppl),
the reference being the retrained expert when there is one, else the old expert's gain over the old base
(as a relative gain carried to the new base's perplexity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertkit.base import IDENTITY_KEYS, Base, BaseSpec, perplexity
from expertkit.config import PortOptions, ProjectConfig
from expertkit.fsutil import atomic_write_text, sha256_of
from expertkit.library import ADAPTER_WEIGHTS, BASE, Library
from expertkit.porting.task_term import MEASURE_SPLIT
from expertkit.progress import console

REPORT = "port_report"  # port_report.json / .md in the new library's folder
STAGES = ("ported", "refreshed", "retrained")  # the new-base experts a report can compare
CARRY, REFRESH, RETRAIN = "carry over", "refresh", "retrain"


@dataclass
class ExpertRecord:
    """What was measured of one expert, stage by stage (`old` is the old expert on the old base)."""

    domain: str
    ppl: dict[str, float] = field(default_factory=dict)  # old_base, old, new_base, ported, refreshed, retrained
    correct: dict[str, list[int]] = field(default_factory=dict)  # old, ported, ...: per task example
    tokens: dict[str, list[bool]] = field(default_factory=dict)  # old, ported, ...: top-1 right, per test token
    task: str | None = None


@dataclass
class Measurer:
    """Scores compositions of a base + library on each expert's own domain and (when it has one) its labeled task."""

    cfg: ProjectConfig
    experts: dict[str, str]  # expert -> domain
    task_examples: int
    tasks_data: Path | None
    records: dict[str, ExpertRecord] = field(default_factory=dict)
    # what was measured, by content (base weights, adapter weights, domain): a caller that ports one library
    # twice (the port suite: plain and compatible refresh) passes one memo and measures each thing once
    memo: dict = field(default_factory=dict)

    def __post_init__(self):
        """Resolve and check the task files now, before the port writes or trains anything."""
        from expertkit.tasks.local import default_data_root, domain_tasks, resolve

        self.records = {name: ExpertRecord(domain) for name, domain in self.experts.items()}
        self._blocks = None
        tasks = domain_tasks(set(self.experts.values())) if self.task_examples else {}
        root = self.tasks_data or default_data_root()
        self._tasks = {domain: (task, resolve([task], root, split=MEASURE_SPLIT)) for domain, task in tasks.items()}

    def measure(self, spec: BaseSpec, library: Library, stage: str, base_stage: str | None = None) -> None:
        """Record `stage` (each expert of `library` on a fresh copy of the base `spec` names) and, with
        `base_stage`, the bare base itself. The copy is dropped afterwards: each library gets a clean base.
        What the memo already holds is not measured again."""
        names = [n for n in self.experts if library.has_name(n)]
        base_id = (*(spec.identity.get(k) for k in IDENTITY_KEYS), self.task_examples,
                   self.cfg.evaluation.model_dump_json())
        keys = {name: (base_id, sha256_of(library.get(name).path / ADAPTER_WEIGHTS), self.experts[name])
                for name in names}
        base_keys = {name: (base_id, BASE, self.experts[name]) for name in names} if base_stage else {}
        todo = [n for n in names if keys[n] not in self.memo or base_keys.get(n, keys[n]) not in self.memo]
        console.print(f"port report: measuring {stage}" + ("" if todo else " (measured before: reused)"),
                      highlight=False)
        if todo:
            self._measure_now(spec, library, todo, keys, base_keys)
        for name in names:
            record = self.records[name]
            record.ppl[stage], record.tokens[stage], correct = self.memo[keys[name]]
            if correct is not None:
                record.task = self._tasks[self.experts[name]][0]
                record.correct[stage] = correct
            if base_stage:
                record.ppl[base_stage] = self.memo[base_keys[name]]

    def _measure_now(self, spec: BaseSpec, library: Library, names: list[str], keys: dict, base_keys: dict) -> None:
        """Measure `names` (and, where `base_keys` has them, the bare base) into the memo."""
        from expertkit.compose import build_compositions
        from expertkit.evaluate import test_blocks
        from expertkit.runtime import ExpertPool

        base = spec.load_private()
        if self._blocks is None:
            self._blocks = test_blocks(self.cfg, base.tokenizer)
        pool = ExpertPool(base, library, names=names)
        compositions = {c.name: c for c in build_compositions(pool, [BASE, *names])}
        batch = self.cfg.evaluation.batch_size
        for name in names:
            domain = self.experts[name]
            ppl, tokens = text_scores(compositions[name], self._blocks[domain], batch)
            correct = (self._correct(compositions[name], base, pool, self._tasks[domain][1])
                       if domain in self._tasks else None)
            self.memo[keys[name]] = (ppl, tokens, correct)
            if name in base_keys:
                self.memo[base_keys[name]] = text_scores(compositions[BASE], self._blocks[domain], batch)[0]

    def _correct(self, composition, base: Base, pool, specs: list) -> list[int]:
        from expertkit.tasks.run import evaluate_on_tasks

        rows = evaluate_on_tasks({composition.name: (composition, "")}, base.tokenizer, pool.context_length or 2048,
                                 specs, self.task_examples, self.cfg.evaluation.batch_size, per_example=True)
        return rows[0]["correct"]


@torch.no_grad()
def text_scores(composition, blocks, batch_size: int) -> tuple[float, list[bool]]:
    """Perplexity on the blocks, and for every scored token whether the composition's top-1 guess was it."""
    from expertkit.evaluate import shifted_nll

    total, count, correct = 0.0, 0, []
    for i in range(0, len(blocks), batch_size):
        part = blocks.take(slice(i, i + batch_size))
        logits, _ = composition.prefill(part.input_ids, part.attention_mask)
        nll, n = shifted_nll(logits, part.labels)
        total, count = total + nll, count + n
        targets = part.labels[:, 1:].to(logits.device)
        correct += (logits[:, :-1].argmax(-1) == targets)[targets != -100].tolist()
    return perplexity(total / max(count, 1)), correct


def flips(old: list[int], new: list[int]) -> tuple[float, float]:
    """(negative, positive) flip rates of `new` against `old`, as fractions of the examples."""
    n = len(old)
    negative = sum(1 for a, b in zip(old, new) if a and not b)
    positive = sum(1 for a, b in zip(old, new) if b and not a)
    return negative / n, positive / n


def recovery(new_base: float, ppl: float | None, reference: float) -> float | None:
    """The share of the reference's perplexity gain over the new base that `ppl` keeps."""
    if ppl is None or new_base == reference:
        return None
    return (new_base - ppl) / (new_base - reference)


def expert_summary(record: ExpertRecord, options: PortOptions) -> dict:
    """One expert's row of the report: perplexities, recoveries, accuracies, flips and the verdict."""
    ppl = record.ppl
    if "retrained" in ppl:
        reference, reference_kind = ppl["retrained"], "retrained"
    else:  # the old expert's relative gain, carried to the new base's perplexity
        reference, reference_kind = ppl["new_base"] * ppl["old"] / ppl["old_base"], "old expert's gain"
    row = {"domain": record.domain, "reference": reference_kind, "task": record.task,
           **{f"{stage}_ppl": value for stage, value in ppl.items()}}
    for stage in STAGES:
        row[f"{stage}_recovery"] = recovery(ppl["new_base"], ppl.get(stage), reference)
    old = record.correct.get("old")
    for stage, correct in record.correct.items():
        row[f"{stage}_acc"] = sum(correct) / len(correct)
        if old is not None and stage != "old":
            row[f"{stage}_negative_flips"], row[f"{stage}_positive_flips"] = flips(old, correct)
    for stage, right in record.tokens.items():
        if stage != "old" and "old" in record.tokens:
            row[f"{stage}_token_negative_flips"], row[f"{stage}_token_positive_flips"] = flips(record.tokens["old"],
                                                                                             right)
    row["verdict"] = verdict(row, options)
    return row


def verdict(row: dict, options: PortOptions) -> str:
    """Carry over if the ported expert keeps enough of the gain and of the reference's task accuracy; refresh if
    the refreshed one does; else retrain (or, when no refresh was measured, say that a refresh would tell)."""

    reference = row.get("retrained_acc", row.get("old_acc"))  # retraining is the alternative: compare with it

    def good(stage: str) -> bool:
        kept = row.get(f"{stage}_recovery")
        accuracy = row.get(f"{stage}_acc")
        accurate = accuracy is None or reference is None or 100 * (reference - accuracy) <= options.accuracy_drop
        return kept is not None and kept >= options.carry_recovery and accurate

    if good("ported"):
        return CARRY
    if "refreshed_recovery" not in row or row["refreshed_recovery"] is None:
        return f"{REFRESH} or {RETRAIN} (run with --refresh STEPS to tell)"
    return REFRESH if good("refreshed") else RETRAIN


def write(report: dict, out: Path) -> dict[str, Path]:
    paths = {"json": out / f"{REPORT}.json", "md": out / f"{REPORT}.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    return paths


def markdown(report: dict) -> str:
    stages = [s for s in ("new_base", "ported", "refreshed", "retrained")
              if any(f"{s}_ppl" in row for row in report["experts"].values())]
    head = ["expert", "domain", *[f"{s} ppl" for s in stages], "ported kept", "refreshed kept", "task",
            "old acc", "ported acc", "refreshed acc", "neg flips (ported/refreshed)", "verdict"]
    lines = [f"# Port of {report['from_library']} to {report['to_base']['name']}", "",
             f"Refresh: {report['refresh']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in report["experts"].items():
        cells = [name, row["domain"], *[_num(row.get(f"{s}_ppl")) for s in stages],
                 _pct(row.get("ported_recovery")), _pct(row.get("refreshed_recovery")), row.get("task") or "-",
                 _pct(row.get("old_acc")), _pct(row.get("ported_acc")), _pct(row.get("refreshed_acc")),
                 f"{_pct(row.get('ported_negative_flips'))} / {_pct(row.get('refreshed_negative_flips'))}",
                 row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Kept: share of the reference gain over the new base ("
              + ", ".join(sorted({row["reference"] for row in report["experts"].values()})) + ")."]
    for what, note in report["other_entries"].items():
        lines.append(f"- {what}: {note}")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
