"""`--executor ray`: every job is a Ray task with the CPUs/GPUs it asks for; the driver shows their progress.

Ray is imported here only, when this executor is chosen, so the default local
executor works without it (`pip install 'expertkit[ray]'` adds it). Before any
job runs the executor proves it can work: the cluster address answers (short TCP
timeout, then `ray.init`), some node has the resources one job asks for, and
every node sees the driver's library and base folders (a token file written by
the driver, read back by a tiny task pinned to each node). Workers only compute
and write checkpoints; results come back to the driver, which writes the library.
A worker that dies is retried (`max_retries`), and a training job then resumes
from its last checkpoint.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any, Callable

from expertkit.errors import ExpertkitError
from expertkit.executors.base import Context, Executor, Job, JobFn, register
from expertkit.executors.ray_worker import ProgressHub, listing_fingerprint, probe_paths, run_job
from expertkit.progress import console, progress_board

CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 120.0  # workers may have to start (and import torch) before they answer
POLL_S = 0.25
PROBE_PREFIX = ".expertkit-probe-"


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExpertkitError("--executor ray needs Ray, an optional extra: pip install 'expertkit[ray]'") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address (host:port or ray://host:port)."""
    if address == "auto":
        return  # ray.init finds the cluster started on this machine, or says there is none
    client = address.startswith("ray://")
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep:
        host, port = hostport, "10001" if client else "6379"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise ExpertkitError(f"cannot reach the Ray cluster at {address} ({getattr(e, 'strerror', None) or e}); "
                             "start it with `ray start --head` there and pass its address (host:6379 or "
                             "ray://host:10001), or leave out --address to start Ray on this machine") from None


def write_token(folder: Path, token: str) -> Path | None:
    """The driver's proof file in a folder it can write (None: read-only, so its listing is compared instead)."""
    path = folder / f"{PROBE_PREFIX}{token}"
    try:
        path.write_text(token)
    except OSError:
        return None
    return path


@register("ray")
class RayExecutor(Executor):
    OPTIONS = ("address", "cpus_per_job", "gpus_per_job", "max_retries")

    def __init__(self, address: str | None = None, cpus_per_job: float = 1.0, gpus_per_job: float = 0.0,
                 max_retries: int = 3):
        if cpus_per_job <= 0 or gpus_per_job < 0 or max_retries < 0:
            raise ExpertkitError("--cpus-per-job must be > 0, --gpus-per-job and --max-retries >= 0")
        self.ray = import_ray()
        # no address: RAY_ADDRESS if set (Ray's own convention), else a new local instance; "local" forces that
        self.address = None if address == "local" else address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_job, self.gpus_per_job, self.max_retries = cpus_per_job, gpus_per_job, max_retries
        self.started = False
        self._connect()
        if not self._job_nodes():  # a job asking for more than any node has would wait forever: say so now
            self.close()
            raise ExpertkitError(f"no node of the Ray cluster has the {cpus_per_job:g} CPUs and {gpus_per_job:g} GPUs "
                                 "that one job asks for; lower --cpus-per-job / --gpus-per-job or add such a node")
        self._task = self.ray.remote(run_job)
        self._hub_class = self.ray.remote(num_cpus=0)(ProgressHub)
        self._context: tuple[str | None, Any] = (None, None)  # (key, object ref) of the last context shipped

    # ------------------------------------------------------------ pre-flight

    def _connect(self) -> None:
        ray = self.ray
        if self.address is not None:
            check_reachable(self.address)
        if ray.is_initialized():  # this process already has a session (a notebook, the tests): use it
            current = ray.get_runtime_context().gcs_address
            if self.address not in (None, "auto", current):
                raise ExpertkitError(f"this process is already connected to the Ray cluster at {current}; "
                                     f"it cannot also use {self.address}")
            return
        try:
            if self.address is None:
                ray.init(include_dashboard=False, logging_level="WARNING")
            else:
                ray.init(address=self.address, logging_level="WARNING")
        except Exception as e:  # connection failures come as several types; all mean the same to the user
            where = self.address or "a new local instance"
            raise ExpertkitError(f"cannot start or join Ray at {where}: {str(e).strip().splitlines()[0]}") from None
        self.started = True
        cpus = ray.cluster_resources().get("CPU", 0)
        console.print(f"ray: {'started a local instance' if self.address is None else 'connected to ' + self.address}"
                      f" ({cpus:g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs)", highlight=False)

    def _job_nodes(self) -> list[dict]:
        """The live nodes where one job fits (the ones whose view of the filesystem matters)."""
        def fits(node: dict) -> bool:
            res = node.get("Resources", {})
            return res.get("CPU", 0) >= self.cpus_per_job and res.get("GPU", 0) >= self.gpus_per_job

        return [n for n in self.ray.nodes() if n.get("Alive") and fits(n)]

    @property
    def slots(self) -> int:
        res = self.ray.cluster_resources()
        n = int(res.get("CPU", 0) // self.cpus_per_job)
        if self.gpus_per_job:
            n = min(n, int(res.get("GPU", 0) // self.gpus_per_job))
        return max(1, n)

    def check_shared(self, paths: dict[str, Path]) -> None:
        """Every node that can run a job must see each folder at the same path, with the token just written."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probes, written = [], []
        for what, folder in paths.items():
            folder = Path(folder).resolve()
            if not folder.is_dir():
                continue  # not a local folder (a hub id): the workers fetch it themselves
            token = secrets.token_hex(8)
            path = write_token(folder, token)
            if path is not None:
                written.append(path)
            probes.append((what, str(folder), path.name if path else None, token if path else
                           listing_fingerprint(folder)))
        if not probes:
            return
        probe = self.ray.remote(num_cpus=0, max_retries=1)(probe_paths)
        try:
            nodes = self._job_nodes()
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(probes) for n in nodes]
            answers = self.ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise ExpertkitError(f"the Ray workers did not answer the shared-folder probe in {PROBE_TIMEOUT_S:.0f}s; "
                                 "check that the cluster's nodes are healthy (`ray status`)") from None
        finally:
            for path in written:
                path.unlink(missing_ok=True)
        for node, answer in zip(nodes, answers):
            if answer["missing"]:
                what, folder = answer["missing"][0]
                raise ExpertkitError(
                    f"Ray workers on node {node.get('NodeManagerAddress', answer['node'])} cannot see the {what} at "
                    f"{folder}; put it on a filesystem every node mounts at the same path (NFS or another shared "
                    "disk) and point the project at that path")

    # ------------------------------------------------------------ running jobs

    def map(self, fn: JobFn, jobs: list[Job], context: Context, *, title: str | None = None,
            on_result: Callable[[Job, Any], None] | None = None) -> list:
        ray = self.ray
        threads = max(1, int(self.cpus_per_job))
        shows = title is not None or any(job.total for job in jobs)
        hub = self._hub_class.remote() if shows else None  # jobs without bars (search trials) report nothing
        if self._context[0] != context.key:  # shipped once per context, even across maps (a search's generations)
            self._context = (context.key, ray.put(context))
        context_ref = self._context[1]
        refs = {}
        for i, job in enumerate(jobs):
            task = self._task.options(name=job.label, num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job,
                                      max_retries=self.max_retries, retry_exceptions=False)
            refs[task.remote(fn, job.payload, context_ref, hub, i, threads)] = i
        results: list = [None] * len(jobs)
        pending = list(refs)
        try:
            with progress_board() as board:
                bars = _Bars(board, jobs, title)
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
                    if hub is not None:
                        bars.show(ray.get(hub.snapshot.remote()))
                    for ref in ready:
                        i = refs[ref]
                        results[i] = self._result(ref, jobs[i])
                        bars.finish(i)
                        if on_result is not None:
                            on_result(jobs[i], results[i])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if hub is not None:
                ray.kill(hub)
        return results

    def _result(self, ref, job: Job):
        """The job's result; a user error inside it is re-raised as itself, a worker lost for good is explained."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as e:
            if isinstance(e.cause, ExpertkitError):
                raise ExpertkitError(f"{job.label}: {e.cause}") from None
            raise
        except exceptions.RayError as e:
            raise ExpertkitError(f"{job.label}: its Ray worker was lost {self.max_retries + 1} times "
                                 f"({type(e).__name__}); finished work is kept, run the command again to resume "
                                 "from the last checkpoint") from None

    def close(self) -> None:
        self._context = (None, None)
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False


class _Bars:
    """The driver's bars for a map: one per job with steps, or one titled bar summing all jobs."""

    def __init__(self, board, jobs: list[Job], title: str | None):
        self.board, self.jobs, self.title = board, jobs, title
        self.done = {i: 0 for i in range(len(jobs))}
        self.info = {i: "" for i in range(len(jobs))}
        self.latest = ""
        if title is not None:
            self.keys = {None: board.add(title, sum(j.total for j in jobs))}
        else:
            self.keys = {i: board.add(j.label, j.total) for i, j in enumerate(jobs) if j.total}

    def show(self, snapshot: dict) -> None:
        changed = [i for i, (done, info) in snapshot.items() if (done, info) != (self.done[i], self.info[i])]
        for i in changed:
            self.done[i], self.info[i] = snapshot[i]
            self.latest = self.info[i] or self.latest
        self._draw(changed)

    def finish(self, i: int) -> None:
        if self.done[i] != self.jobs[i].total:
            self.done[i] = self.jobs[i].total
            self._draw([i])

    def _draw(self, changed: list[int]) -> None:
        if self.title is not None:
            if changed:
                self.board.update(self.keys[None], sum(self.done.values()), self.latest)
            return
        for i in changed:
            if i in self.keys:
                self.board.update(self.keys[i], self.done[i], self.info[i])
