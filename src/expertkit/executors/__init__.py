"""Where independent jobs run: `local` (this process, sequential; the default) or `ray` (a Ray cluster).

See base.py for the interface. Importing this package never imports Ray; the
ray executor imports it when it is chosen.
"""

from expertkit.executors.base import (Context, ContextCache, Executor, Job, executor_names, get_executor,
                                      no_progress, register)
from expertkit.executors import local, ray_executor  # noqa: F401  (each module registers its executor)
from expertkit.executors.local import LocalExecutor

__all__ = ["Context", "ContextCache", "Executor", "Job", "LocalExecutor", "executor_names", "get_executor",
           "no_progress", "register"]
