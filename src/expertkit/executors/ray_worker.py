"""What runs inside a Ray worker process: the job wrapper, its progress reporter and the file probe.

Nothing here imports Ray: the driver wraps these plain functions and classes with
`ray.remote` (see ray_executor.py), and the workers import this module by name.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

from expertkit.executors.base import Context, ContextCache, no_progress

REPORT_EVERY_S = 0.2  # a worker sends its step count at most this often (plus once at the end)

_CONTEXTS = ContextCache()  # per worker process: the base / pool built for the latest map stays loaded


class ProgressHub:
    """A tiny actor the workers report their step counts to and the driver polls for its bars."""

    def __init__(self) -> None:
        self.state: dict[int, tuple[int, str]] = {}

    def report(self, index: int, done: int, info: str) -> None:
        self.state[index] = (done, info)

    def snapshot(self) -> dict[int, tuple[int, str]]:
        return dict(self.state)


class RemoteAdvance:
    """The `advance(n=1, info="")` a job calls; sends absolute counts so a retried job restarts its bar."""

    def __init__(self, hub, index: int):
        self.hub, self.index = hub, index
        self.done, self.info, self.sent_at = 0, "", 0.0

    def __call__(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info or self.info
        if time.monotonic() - self.sent_at >= REPORT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self.hub.report.remote(self.index, self.done, self.info)
        self.sent_at = time.monotonic()


def run_job(fn, payload, context: Context, hub, index: int, threads: int):
    """One job in a worker: `threads` torch threads (so workers sharing a node do not oversubscribe it)."""
    import torch

    from expertkit.quiet import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(threads)
    if hub is None:
        return fn(payload, _CONTEXTS.get(context), no_progress)
    advance = RemoteAdvance(hub, index)
    result = fn(payload, _CONTEXTS.get(context), advance)
    advance.flush()
    return result


# ---------------------------------------------------------------- the shared-filesystem probe


def listing_fingerprint(folder: Path) -> str:
    """Names and sizes of a folder's files: proves a read-only folder (a base model) is the same one."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def probe_paths(probes: list[tuple[str, str, str | None, str]]) -> dict:
    """Which of the driver's folders this node sees: (what, folder, token file or None, expected content)."""
    missing = []
    for what, folder, token_file, expected in probes:
        try:
            seen = (Path(folder) / token_file).read_text() if token_file else listing_fingerprint(Path(folder))
        except OSError:
            seen = None
        if seen != expected:
            missing.append((what, folder))
    return {"node": socket.gethostname(), "pid": os.getpid(), "missing": missing}
