"""Train a router from the library's domain data, calibrate its abstain threshold, and measure it.

Labels are the library's experts (each one's training domain) plus "base",
whose examples are the general corpus when the project has one: text no
expert was trained for should be answered by the base. Routers learn from
documents and their first tokens (prompts are short), and from prompt files
(`routing.prompts`: what users send, e.g. everyday requests for the base), of
which a hashed share is held out to calibrate and validate on.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from expertkit.config import ProjectConfig, RoutingConfig
from expertkit.data import Example, load_corpus
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


def prefixes(tokenizer, texts: list[str], n_tokens: int, longer_only: bool = False) -> list[str]:
    """The text of each document's first `n_tokens` tokens (with `longer_only`, only of the documents longer
    than that: a shorter one is its own prefix)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(x[:n_tokens]) for x in ids if not longer_only or len(x) > n_tokens]


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
    return {label: spread([text for ex in corpora[d].splits[split] for text in routing_units(ex)], per_label)
            for label, d in labels.items() if d is not None}


def routing_units(example: Example) -> list[str]:
    """The texts a router learns and is measured on in one example: a document, or each line of a piece of a
    running text.

    A file read as one stream comes in pieces of 64 lines; a prompt is the size of one of its lines (a news
    title, a description, a question, a source line). Learning from whole pieces gave a router 200 long
    texts per domain and a base class of short prompts, and it sent short domain prompts to the base (AG
    News questions on SmolLM2 39% of the time; from lines, with the lexical fit's balanced classes, 5%)."""
    if not example.continues:
        return [example.full_text]
    return [line for line in example.full_text.splitlines() if line.strip()]


def with_prefixes(tokenizer, texts_by_label: dict[str, list[str]], settings: RoutingConfig) -> dict[str, list[str]]:
    """Each document whole and as its first few tokens: prompts are short, so routers learn and calibrate on both.
    A document no longer than the prefix is listed once, not twice."""
    return {label: texts + prefixes(tokenizer, texts, settings.calibration_prefix_tokens, longer_only=True)
            for label, texts in texts_by_label.items() if texts}


def join(*parts: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in parts:
        for label, texts in part.items():
            out[label] = out.get(label, []) + list(texts)
    return out


def labelled_prompts(settings: RoutingConfig, labels: dict[str, str | None]) -> tuple[dict, dict]:
    """(training, held-out) prompts per label from `routing.prompts`, split by a hash of each prompt's text."""
    unknown = sorted(set(settings.prompts) - set(labels))
    if unknown:
        raise ExpertkitError(f"routing.prompts names {unknown}, which are not labels of this router; labels: "
                             f"{list(labels)} (an expert's name, or '{BASE}')")
    train, held = {}, {}
    for label, path in settings.prompts.items():
        texts = read_prompts(Path(path))
        held[label] = [t for t in texts if held_out(t, settings.prompt_holdout)]
        train[label] = [t for t in texts if not held_out(t, settings.prompt_holdout)]
        if not train[label] or not held[label]:
            raise ExpertkitError(f"routing.prompts['{label}'] ({path}) has {len(texts)} prompts: too few to both "
                                 "train on and hold out; give at least a few dozen")
    return train, held


def held_out(text: str, share: float) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 16 ** 8 < share


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt (one per non-empty line) or a .jsonl (one object with a 'text' string per line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ExpertkitError(f"prompt file {path} not found; fix routing.prompts") from None
    except UnicodeDecodeError:
        raise ExpertkitError(f"prompt file {path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExpertkitError(f"{path}:{number}: invalid JSON ({e.msg}); give one object with a 'text' per "
                                 "line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ExpertkitError(f"{path}:{number}: expected an object with a non-empty 'text' string")
        texts.append(row["text"])
    return texts


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
    train_prompts, held_prompts = labelled_prompts(settings, labels)
    train_prompts = {label: spread(texts, per_label) for label, texts in train_prompts.items()}
    documents = with_prefixes(pool.tokenizer, domain_texts(cfg, labels, "train", per_label), settings)
    data = TrainingData.from_texts(pool.tokenizer, list(labels), join(documents, train_prompts))
    started = time.perf_counter()
    router = cls.fit(pool, data, settings)
    fit_seconds = time.perf_counter() - started
    valid = with_prefixes(pool.tokenizer, domain_texts(cfg, labels, "valid", settings.calibration_documents),
                          settings)
    if not any(valid.get(e) for e in router.experts):
        raise ExpertkitError("the experts' domains have no validation split; the abstain threshold is calibrated on it")
    probs, targets = probabilities(router, pool, valid, settings)
    if held_prompts:  # calibrated on the held-out prompts too, and measured on them alone
        prompt_probs, prompt_targets = probabilities(router, pool, held_prompts, settings)
        probs, targets = torch.cat([probs, prompt_probs]), torch.cat([targets, prompt_targets])
    threshold = calibrate_threshold(expert_confidence(probs[targets != len(router.labels) - 1]), settings.abstain_rate)
    report = {"abstain_rate": settings.abstain_rate, "fit_seconds": round(fit_seconds, 2), "domains": labels,
              "validation": summary(probs, targets, threshold)}
    if held_prompts:
        report["prompt_validation"] = {**summary(prompt_probs, prompt_targets, threshold),
                                       "by_label": per_label_accuracy(prompt_probs, prompt_targets, threshold,
                                                                      router.labels)}
    return CalibratedRouter(name, router, threshold, settings), report


def per_label_accuracy(probs: torch.Tensor, targets: torch.Tensor, threshold: float, labels: list[str]) -> dict:
    """{label: accuracy of the final choice on that label's prompts} for the labels that have prompts."""
    choices = decide(probs, threshold)
    return {label: accuracy(choices[targets == i], targets[targets == i])
            for i, label in enumerate(labels) if bool((targets == i).any())}
