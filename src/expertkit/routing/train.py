"""Train a router from the library's domain data, calibrate its abstain threshold, and measure it.

Labels are the library's experts (each one's training domain) plus "base",
whose examples are the general corpus when the project has one: text no
expert was trained for should be answered by the base.
"""

from __future__ import annotations

import time

import torch

from expertkit.config import ProjectConfig, RoutingConfig
from expertkit.data import load_corpus
from expertkit.errors import ExpertkitError
from expertkit.library import Kind
from expertkit.routing.base import BASE, TrainingData, router_class
from expertkit.routing.calibrate import accuracy, calibrate_threshold, decide, expert_confidence
from expertkit.routing.store import CalibratedRouter


def spread(items: list, n: int) -> list:
    """At most n items, evenly spaced over the list (deterministic, and covers the whole split)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def prefixes(tokenizer, texts: list[str], n_tokens: int) -> list[str]:
    """The text of each document's first `n_tokens` tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(x[:n_tokens]) for x in ids]


def label_domains(cfg: ProjectConfig, pool) -> dict[str, str | None]:
    """label -> domain whose text exemplifies it: one per library expert, then "base" (general or None)."""
    experts = {e.name: e.domain for e in pool.entries if e.kind == Kind.EXPERT}
    if not experts:
        raise ExpertkitError(f"library {cfg.library} has no experts to route to; train some with `expertkit train`")
    known = {d.name for d in cfg.all_domains()}
    unknown = {name: d for name, d in experts.items() if d not in known}
    if unknown:
        raise ExpertkitError(f"experts {unknown} were trained on domains this config does not list; "
                             "add those domains to the config so the router can read their text")
    return {**experts, BASE: cfg.general.name if cfg.general else None}


def domain_texts(cfg: ProjectConfig, labels: dict[str, str | None], split: str, per_label: int) -> dict[str, list[str]]:
    corpora = {d: load_corpus(cfg.domain(d)) for d in set(labels.values()) if d is not None}
    return {label: spread([ex.full_text for ex in corpora[d].splits[split]], per_label)
            for label, d in labels.items() if d is not None}


def calibration_texts(tokenizer, texts_by_label: dict[str, list[str]], settings: RoutingConfig) -> dict[str, list[str]]:
    """Each validation document whole and as its first few tokens."""
    return {label: texts + prefixes(tokenizer, texts, settings.calibration_prefix_tokens)
            for label, texts in texts_by_label.items() if texts}


def probabilities(router, pool, texts_by_label: dict[str, list[str]], settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [N, L], target label index [N]) of a router on labelled texts."""
    data = TrainingData.from_texts(pool.tokenizer, router.labels, texts_by_label)
    return router.probabilities(pool, data.prompts, settings), data.targets


def summary(probs: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict:
    """Accuracy of the final choice (abstentions included) and the share of expert prompts abstained on."""
    on_experts = targets != probs.shape[1] - 1
    abstained = expert_confidence(probs) < threshold
    return {"accuracy": accuracy(decide(probs, threshold), targets),
            "abstain_rate": float(abstained[on_experts].float().mean()) if on_experts.any() else 0.0,
            "n": len(targets)}


def evaluate(calibrated: CalibratedRouter, pool, texts_by_label: dict[str, list[str]]) -> dict:
    return summary(*probabilities(calibrated.router, pool, texts_by_label, calibrated.settings), calibrated.threshold)


def train_router(cfg: ProjectConfig, pool, kind: str, name: str, abstain_rate: float | None = None) -> tuple:
    """Fit, calibrate on validation data, and measure; returns (CalibratedRouter, report). Nothing is written."""
    settings = cfg.routing if abstain_rate is None else cfg.routing.model_copy(update={"abstain_rate": abstain_rate})
    cls = router_class(kind)
    labels = label_domains(cfg, pool)
    pool.ensure([label for label in labels if label != BASE])
    per_label = settings.train_documents if kind == "lexical" else settings.model_documents
    data = TrainingData.from_texts(pool.tokenizer, list(labels), domain_texts(cfg, labels, "train", per_label))
    started = time.perf_counter()
    router = cls.fit(pool, data, settings)
    fit_seconds = time.perf_counter() - started
    valid = calibration_texts(pool.tokenizer, domain_texts(cfg, labels, "valid", settings.calibration_documents),
                              settings)
    if not any(valid.get(e) for e in router.experts):
        raise ExpertkitError("the experts' domains have no validation split; the abstain threshold is calibrated on it")
    probs, targets = probabilities(router, pool, valid, settings)
    threshold = calibrate_threshold(expert_confidence(probs[targets != len(router.labels) - 1]), settings.abstain_rate)
    report = {"abstain_rate": settings.abstain_rate, "fit_seconds": round(fit_seconds, 2), "domains": labels,
              "validation": summary(probs, targets, threshold)}
    return CalibratedRouter(name, router, threshold, settings), report
