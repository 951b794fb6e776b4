"""Executors: where independent jobs run, behind one interface and a registry.

Branch-Train-Merge experts train independently, and so do the scorecard's
composition x domain cells and the trials of a merge search. Callers describe
such work as a list of `Job`s plus one `Context` (what every job of a map
shares and a worker process builds once: the loaded base, a pool of adapters,
data) and ask an executor to `map` a module-level function over them:

    results = executor.map(fn, jobs, context, title=..., on_result=...)
    # each job runs fn(job.payload, context_value, advance); advance(n=1, info="")
    # moves its progress bar; on_result(job, result) runs in the driver as each finishes

`local` runs the jobs one after another in this process (the default; needs
nothing beyond expertkit). `ray` runs each job as a Ray task. A new backend is
one class with `@register("name")`; callers never name a backend.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from expertkit.errors import ExpertkitError
from expertkit.registry import Registry

Advance = Callable[..., None]  # advance(n: int = 1, info: str = "")
JobFn = Callable[[Any, Any, Advance], Any]  # fn(payload, context value, advance) -> result


@dataclass(frozen=True)
class Job:
    """One independent piece of work. `total` is the progress units it reports (0: no bar of its own)."""

    label: str
    payload: Any
    total: int = 0


@dataclass(frozen=True)
class Context:
    """State shared by the jobs of a map, built by `build()` at most once per process and context.

    `build` must be picklable (a module-level function or a functools.partial of one) for an
    executor that ships it to other processes; `key` tells a worker it already built this one.
    """

    build: Callable[[], Any]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


class ContextCache:
    """Holds the one most recently built context value: a worker keeps its base and pool between jobs."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: Any = None

    def get(self, context: Context) -> Any:
        if self.key != context.key:
            self.key, self.value = None, None  # free the old state before building the new one
            self.value = context.build()
            self.key = context.key
        return self.value


def no_progress(n: int = 1, info: str = "") -> None:
    """The `advance` of a job that has no bar."""


class Executor(ABC):
    """Runs independent jobs; a context manager so a backend can release what it started."""

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[tuple[str, ...]] = ()  # keyword options the constructor takes (CLI flag = --option-name)

    @property
    def slots(self) -> int:
        """How many jobs run at the same time (a search sizes its generations by it)."""
        return 1

    def check_shared(self, paths: dict[str, Path]) -> None:
        """Prove before any work that every worker sees these driver folders ({what: path}); local: nothing to do."""

    @abstractmethod
    def map(self, fn: JobFn, jobs: list[Job], context: Context, *, title: str | None = None,
            on_result: Callable[[Job, Any], None] | None = None) -> list:
        """Run fn over the jobs; results in job order. `title`: one bar for all jobs, else one bar per job."""

    def close(self) -> None:
        """Release what this executor started (a local Ray instance, say)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


EXECUTORS: Registry[type[Executor]] = Registry("executor")


def register(name: str):
    """Class decorator: `@register("ray")` makes the executor available as `--executor ray`."""
    return EXECUTORS.register(name, stamp="name")


def executor_names() -> list[str]:
    return EXECUTORS.names()


def get_executor(name: str = "local", **options) -> Executor:
    """The executor registered as `name`, built with the options that were given (None = not given)."""
    cls = EXECUTORS.get(name)
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - set(cls.OPTIONS))
    if extra:
        flags = ", ".join(_flag(k) for k in extra)
        takes = ", ".join(_flag(k) for k in cls.OPTIONS) or "no options"
        raise ExpertkitError(f"{flags} is not an option of the '{name}' executor (it takes {takes}); "
                             f"executors: {EXECUTORS.listing()}")
    return cls(**given)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")
