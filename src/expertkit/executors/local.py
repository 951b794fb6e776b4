"""The default executor: every job in this process, one after another, as expertkit always ran.

It needs nothing beyond expertkit itself (no Ray), passes the driver's own
objects to the jobs (a context's build runs here, on the loaded base), and keeps
the progress output of a sequential run: one bar per job, or one titled bar.
"""

from __future__ import annotations

from typing import Any, Callable

from expertkit.executors.base import Context, ContextCache, Executor, Job, JobFn, no_progress, register
from expertkit.progress import progress_bar


@register("local")
class LocalExecutor(Executor):
    def __init__(self) -> None:
        self._contexts = ContextCache()  # lives as long as the executor: a search reuses its pool across maps

    def map(self, fn: JobFn, jobs: list[Job], context: Context, *, title: str | None = None,
            on_result: Callable[[Job, Any], None] | None = None) -> list:
        state = self._contexts.get(context)
        results = []

        def run(job: Job, advance) -> None:
            results.append(fn(job.payload, state, advance))
            if on_result is not None:
                on_result(job, results[-1])

        if title is not None:
            with progress_bar(title, sum(job.total for job in jobs)) as advance:
                for job in jobs:
                    run(job, advance)
            return results
        for job in jobs:
            if job.total:
                with progress_bar(job.label, job.total) as advance:
                    run(job, advance)
            else:
                run(job, no_progress)
        return results

    def close(self) -> None:
        self._contexts = ContextCache()
