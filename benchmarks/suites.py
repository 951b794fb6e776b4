"""The registry of benchmark suites: `@suite("name")` on a function (data, device, base) -> dict.

`bases` lists the base models a suite runs on: "micro" (the tiny Llama the suites pretrain, so that
earlier figures stay comparable) and the real checkpoints of expertkit.models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from expertkit.registry import Registry

MICRO = "micro"
REAL_BASES = ("smollm2-135m", "gemma3-270m")  # expertkit.models
TASK_EXAMPLES = {"per_task": 500}  # examples per task for suites that measure task accuracy (run.py --task-examples)
# run.py --prompts: the route suite measures routing of real prompts; --route-blocks: test blocks per domain of its
# perplexity comparisons (None: the evaluation's on micro, route.REAL_BLOCKS on a real base); --accuracy-only:
# the routers' accuracy and cost alone
ROUTE_OPTIONS = {"prompts": False, "blocks": None, "accuracy_only": False}
PORT_OPTIONS = {"update": "strong"}  # run.py --update: how far the port suite's update moves the base
COLLABORATE_OPTIONS = {"small": "distilled"}  # run.py --small: the collaborate suite's small model on a real --large


@dataclass(frozen=True)
class Suite:
    run: Callable  # (data, device, base) -> JSON-able result
    bases: tuple[str, ...]


SUITES: Registry[Suite] = Registry("benchmark suite")


def suite(name: str, bases: tuple[str, ...] = (MICRO,)):
    def wrap(fn: Callable) -> Callable:
        SUITES.add(name, Suite(fn if len(bases) > 1 else lambda data, device, base: fn(data, device), bases))
        return fn

    return wrap


import collaborate  # noqa: E402,F401  (each suite module registers itself)
import federated  # noqa: E402,F401
import route  # noqa: E402,F401
import scale  # noqa: E402,F401
import serve  # noqa: E402,F401
import specialize  # noqa: E402,F401
import task_accuracy  # noqa: E402,F401

import merge  # noqa: E402,F401
import port  # noqa: E402,F401
