"""The serving engine: one thread that owns the model and decodes every request, step by step.

Continuous batching across experts: every request is prefilled through its composition (arrivals
for the base, experts, merges and mixes together, one mixed-adapter forward whatever each asks for);
when the state that comes back is rows of the engine's pool (a PoolState: the base, an expert, a merge,
a router's choice), those rows join ONE running batch, each step one forward with per-row adapters.
Requests join after their prefill and leave when they finish, between steps. Other compositions
(mixtures, collaborations, full merged models) decode in lanes of their own, still interleaved
step by step with the shared batch, so no request blocks the others. Each row is a
runtime.decoding.Sequence: the generation loop's own sampling, stop and end-of-text rules.

The HTTP side talks to the engine only through `submit` and the events a job emits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from expertkit.config import ServeOptions
from expertkit.errors import ExpertkitError
from expertkit.library import BASE
from expertkit.runtime import (
    BASE_ADAPTER,
    AdapterMix,
    Composition,
    DecodeState,
    ExpertPool,
    PoolState,
    RowAdapter,
    SamplingParams,
    Sequence,
)
from expertkit.runtime.decoding import choose_tokens
from expertkit.runtime.kvcache import check_joinable, join, keep_rows
from expertkit.runtime.tokens import pad_id, pad_left

log = logging.getLogger("expertkit.serve")
PREFILL_ROWS = 64  # prompts prefilled in one forward when many arrive at once
# Every admission costs one prefill forward (about 20 ms of fixed overhead on a small CPU model, plus
# ~2 ms a row) and a re-layout of the running cache, so newcomers are admitted in groups: once a quarter
# of the batch can be filled, or once the oldest has waited ADMIT_WAIT_S (IDLE_WAIT_S when nothing
# runs: enough to gather a burst of requests that arrive together, too short for a person to notice).
ADMIT_SHARE = 0.25
ADMIT_WAIT_S = 0.1
IDLE_WAIT_S = 0.02
_ids = itertools.count()


class QueueFull(ExpertkitError):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclass
class Job:
    """One request as the engine sees it. `emit` receives event dicts, from the engine thread."""

    composition: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[dict], None]
    top_logprobs: int | None = None  # per generated token; None = no logprobs
    prompt_logprobs: bool = False  # echo with logprobs: the prompt's own token logprobs too
    streaming: bool = True  # False: no per-token events unless logprobs are asked; the text comes at the end
    ignore_eos: bool = False  # end-of-text is a token like any other (exactly max_new_tokens are generated)
    composition_params: dict = field(default_factory=dict)  # per request, e.g. a collaboration's alpha
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    sequence: Sequence | None = None  # set on admission
    expert: str | None = None
    ended: bool = False  # one end or error event per job, never two

    @property
    def group(self) -> tuple:
        """Jobs of one group are prefilled together: same composition, same parameters."""
        return self.composition, tuple(sorted(self.composition_params.items()))


class Lane(ABC):
    """Rows decoding together: their jobs, the decode state, and the token each row feeds next."""

    def __init__(self, jobs: list[Job], state: DecodeState, next_ids: torch.Tensor):
        self.jobs, self.state, self.next_ids = jobs, state, next_ids

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Next-token logits [rows, V] of the live rows, feeding `next_ids`."""

    @abstractmethod
    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished or cancelled)."""


class PoolLane(Lane):
    """The shared batch: rows of the pool, each with its own adapter; rows join and leave per step."""

    state: PoolState

    def step(self) -> torch.Tensor:
        logits, self.state = self.state.pool.step(self.state, self.next_ids)
        return logits

    def keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.jobs):
            return
        self.jobs = [self.jobs[i] for i in rows]
        self.next_ids = self.next_ids[rows]
        if rows:
            self.state = keep_rows(self.state, rows)

    def add(self, other: "PoolLane") -> None:
        self.state = join(self.state, other.state)
        self.jobs += other.jobs
        self.next_ids = torch.cat([self.next_ids, other.next_ids])


class AdapterRows(Composition):
    """Arrivals of several plain pool compositions prefilled as one batch: row i on `adapters[i]`."""

    name = "pool rows"

    def __init__(self, pool: ExpertPool, adapters: list[RowAdapter]):
        self.pool, self.adapters = pool, adapters

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None):
        return self.pool.prefill(input_ids, attention_mask, self.adapters, keep_last=keep_last)

    def step(self, state: PoolState, next_ids: torch.Tensor):
        return self.pool.step(state, next_ids)


class CompositionLane(Lane):
    """Requests of one composition admitted together; its state is opaque, so finished rows ride along."""

    def __init__(self, composition: Composition, jobs, state: DecodeState, pad: int):
        super().__init__(jobs, state, torch.zeros(len(jobs), dtype=torch.long))
        self.composition = composition
        self.live = list(range(len(jobs)))  # rows still decoding, as indices into the admitted batch
        self.fed = torch.full((len(jobs),), pad, dtype=torch.long)  # what every row of the batch feeds

    def step(self) -> torch.Tensor:
        logits, self.state = self.composition.step(self.state, self.fed)
        return logits[self.live]

    def keep(self, rows: list[int]) -> None:
        self.live = [self.live[i] for i in rows]
        self.jobs = [self.jobs[i] for i in rows]
        self.next_ids = self.next_ids[rows]
        if rows:
            self.fed[self.live] = self.next_ids


@dataclass
class EngineStats:
    steps: int = 0
    rows_stepped: int = 0  # sum of batch sizes over steps: rows_stepped / steps = mean batch
    prefills: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    failed: int = 0
    routed: int = 0  # requests a router decided (model auto, or a router by name)
    abstained: int = 0  # of those, sent to the base because no expert was confident enough


class Engine:
    """Owns the pool and the compositions; `submit` jobs from any thread, events come back via `job.emit`."""

    def __init__(self, pool: ExpertPool, compositions: dict[str, Composition],
                 max_batch: int = ServeOptions().max_batch, max_queue: int = ServeOptions().max_queue,
                 threads: int | None = None):
        """`threads`: torch's intra-op threads in the engine thread (see server.engine_threads)."""
        if max_batch < 1 or max_queue < 1:
            raise ExpertkitError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.pool, self.compositions = pool, compositions
        self.max_batch, self.max_queue = max_batch, max_queue
        self.tokenizer = pool.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.pending: deque[Job] = deque()
        self.shared: PoolLane | None = None
        self.lanes: list[CompositionLane] = []
        self.stats = EngineStats()
        self.calls: deque[tuple[Callable, Future]] = deque()  # work that must run between decoding steps
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.threads = threads
        if max_batch > 1:
            self._check_batching()

    def _check_batching(self) -> None:
        _, state = self.pool.prefill(torch.tensor([[self.eos or 0]]), torch.ones(1, 1, dtype=torch.long),
                                     [BASE_ADAPTER], keep_last=1)
        check_joinable(state.past)

    # ------------------------------------------------------------ the thread-safe side

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def active_rows(self) -> int:
        return (len(self.shared.jobs) if self.shared else 0) + sum(len(lane.jobs) for lane in self.lanes)

    def submit(self, job: Job) -> None:
        """Queue a job; an unknown model or a parameter its composition does not take is refused here."""
        if job.composition not in self.compositions:
            raise ExpertkitError(f"unknown model '{job.composition}'")
        self.compositions[job.composition].configured(**job.composition_params)
        with self._wake:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} waiting requests); retry later")
            self.pending.append(job)
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the engine thread between two decoding steps (it may change the model: nothing else
        runs it meanwhile); the future holds its result or its exception."""
        future: Future = Future()
        with self._wake:
            self.calls.append((fn, future))
            self._wake.notify()
        return future

    def live_adapters(self) -> set[str]:
        """The PEFT adapter names rows in flight use (only the engine thread may ask)."""
        rows = list(self.shared.state.adapters) if self.shared is not None and self.shared.jobs else []
        names = {n for a in rows for n in (a.adapters if isinstance(a, AdapterMix) else [a])}
        if self.lanes:  # an opaque lane's state may hold any adapter: keep every version while one runs
            names |= set(self.pool.host.entry_of) if self.pool.host is not None else set()
        return names

    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="expertkit-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._running

    def stop(self) -> None:
        self._running = False
        with self._wake:
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        while self._running:
            with self._wake:
                while self._running and not self._admissible() and not self.active_rows and not self.calls:
                    self._wake.wait(timeout=self._admission_wait())
                arrivals = self._take_arrivals() if self._admissible() else []
                calls, self.calls = list(self.calls), deque()
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as e:  # the caller's to report
                    future.set_exception(e)
            try:
                self._admit(arrivals)
                self._step_all()
                self._drop_old_versions()
            except Exception:  # faults are confined per group and lane below; this is the last resort
                log.error("engine loop failed:\n%s", traceback.format_exc())
                self._fail_everything(arrivals, "internal error while decoding; see the server log")

    def _drop_old_versions(self) -> None:
        """Adapters replaced or removed by a library reload go once the last row using them has finished."""
        host = self.pool.host
        if host is not None and len(host.entry_of) > len(host.current):
            host.drop_unused(self.live_adapters())

    def _admissible(self) -> bool:
        """Whether the waiting requests should join now (see ADMIT_SHARE)."""
        room = self.max_batch - self.active_rows
        if not self.pending or room <= 0:
            return False
        group = min(len(self.pending), room)
        limit = ADMIT_WAIT_S if self.active_rows else IDLE_WAIT_S
        return group >= max(1, ADMIT_SHARE * self.max_batch) or group == room or \
            time.monotonic() - self.pending[0].submitted >= limit

    def _admission_wait(self) -> float | None:
        """How long the idle engine may sleep: until the oldest waiting request is due, or until woken."""
        if not self.pending:
            return None
        return max(IDLE_WAIT_S - (time.monotonic() - self.pending[0].submitted), 0.001)

    def _take_arrivals(self) -> list[Job]:
        room = self.max_batch - self.active_rows
        arrivals = []
        while self.pending and len(arrivals) < room:
            arrivals.append(self.pending.popleft())
        return arrivals

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the arrivals: the rows of plain pool compositions (the base, experts, merges, mixes) in
        shared mixed-adapter forwards, whatever adapter each asks for; the others by composition."""
        groups: dict[tuple, list[Job]] = {}
        pooled: list[tuple[Job, RowAdapter]] = []
        for job in jobs:
            if job.cancelled:
                continue
            composition = self.compositions.get(job.composition)
            adapter = None if composition is None or job.composition_params else composition.pool_rows(self.pool)
            if adapter is None:
                groups.setdefault(job.group, []).append(job)
            else:
                pooled.append((job, adapter))
        for start in range(0, len(pooled), PREFILL_ROWS):
            chunk, adapters = map(list, zip(*pooled[start:start + PREFILL_ROWS]))
            with self._confined(chunk, "admitting requests"):
                self._admit_group(AdapterRows(self.pool, adapters), chunk)
        for group in groups.values():
            name, params = group[0].composition, group[0].composition_params
            if name not in self.compositions:  # removed from the library while it waited
                for job in group:
                    self._fail(job, 404, f"model '{name}' was removed from the library while this request waited")
                continue
            for start in range(0, len(group), PREFILL_ROWS):
                chunk = group[start:start + PREFILL_ROWS]
                with self._confined(chunk, f"admitting requests for '{name}'"):
                    self._admit_group(self.compositions[name].configured(**params), chunk)

    @contextlib.contextmanager
    def _confined(self, jobs: list[Job], what: str):
        """A fault while working on `jobs` ends those jobs (that have not ended) with an error, and no other.

        ExpertkitError is the request's fault (a router refusing a prompt, say): 400. Anything else
        (out of memory, a bug in a composition) is the server's: 500, logged with its traceback.
        """
        try:
            yield
        except ExpertkitError as e:
            for job in jobs:
                self._fail(job, 400, str(e))
        except Exception:
            log.error("failed while %s:\n%s", what, traceback.format_exc())
            for job in jobs:
                self._fail(job, 500, f"internal error while {what}; see the server log")

    def _admit_group(self, composition: Composition, jobs: list[Job]) -> None:
        """Prefill `jobs` through their composition; rows of this engine's pool join the shared batch."""
        for job in jobs:
            job.sequence = Sequence(self.tokenizer, job.params, ignore_eos=job.ignore_eos, incremental=job.streaming)
            self.stats.prompt_tokens += len(job.prompt_ids)
        ids, mask = pad_left([job.prompt_ids for job in jobs], pad_id(self.tokenizer))
        # the logits of every prompt position only when a job echoes the prompt's logprobs (memory: T x vocab)
        echo = any(job.prompt_logprobs for job in jobs)
        logits, state = composition.prefill(ids, mask, keep_last=None if echo else 1)
        self.stats.prefills += 1
        routing = getattr(composition, "last_routing", None) if composition.decides_from_prompt else None
        if routing is not None:
            self.stats.routed += len(jobs)
            self.stats.abstained += int(routing.abstained.sum())
        shared = isinstance(state, PoolState) and state.pool is self.pool
        for i, job in enumerate(jobs):
            if shared:
                job.expert = BASE if state.adapters[i] == BASE_ADAPTER else self.pool.entry_name(state.adapters[i])
            job.emit({"type": "start", "expert": job.expert})
        next_ids = torch.zeros(len(jobs), dtype=torch.long)
        lane = PoolLane(jobs, state, next_ids) if shared else CompositionLane(composition, jobs, state,
                                                                               pad_id(self.tokenizer))
        for i, job in enumerate(lane.jobs):
            if job.prompt_logprobs:
                n = len(job.prompt_ids)
                job.emit({"type": "prompt_logprobs",
                          "entries": self._prompt_logprobs(logits[i, -n:], job.prompt_ids, job.top_logprobs)})
        self._advance(lane, logits[:, -1])
        if not lane.jobs:
            return
        if not shared:
            self.lanes.append(lane)
        elif self.shared is None or not self.shared.jobs:
            self.shared = lane
        else:
            self.shared.add(lane)

    def _step_all(self) -> None:
        for lane in [self.shared, *self.lanes]:
            if lane is None or not lane.jobs:
                continue
            jobs = list(lane.jobs)
            with self._confined(jobs, "decoding"):
                logits = lane.step()
                self.stats.steps += 1
                self.stats.rows_stepped += len(lane.jobs)
                self._advance(lane, logits)
            if any(job.ended for job in lane.jobs):  # the lane failed: its rows are gone with it
                lane.keep([])
        self.lanes = [lane for lane in self.lanes if lane.jobs]

    def _advance(self, lane: Lane, logits: torch.Tensor) -> None:
        """Choose each row's next token, emit it, and drop rows that are done."""
        tokens = choose_tokens([job.sequence for job in lane.jobs], logits)
        keep = []
        for i, job in enumerate(lane.jobs):
            sequence = job.sequence
            if job.cancelled:
                continue
            if sequence.done:  # asked for no new tokens at all
                self._finish(job)
                continue
            text = sequence.push(tokens[i])
            if sequence.end_of_text:  # a generated token (no text) with its logprob, as in vLLM: clients that
                # echo the prompt (lm-eval's local-completions) drop the last logprob entry as the generated one
                if job.top_logprobs is not None:
                    job.emit({"type": "token", "text": "", "token": tokens[i],
                              **self._token_logprobs(logits[i], tokens[i], job.top_logprobs)})
                self._finish(job)
                continue
            self.stats.generated_tokens += 1
            if job.streaming or job.top_logprobs is not None:
                event = {"type": "token", "text": text, "token": tokens[i]}
                if job.top_logprobs is not None:
                    event.update(self._token_logprobs(logits[i], tokens[i], job.top_logprobs))
                job.emit(event)
            if sequence.done:
                self._finish(job)
            else:
                keep.append(i)
        lane.next_ids = torch.tensor(tokens, dtype=torch.long)
        lane.keep(keep)

    def _finish(self, job: Job) -> None:
        sequence = job.sequence
        job.ended = True
        self.stats.finished += 1
        job.emit({"type": "end", "text": sequence.rest(), "full_text": sequence.stream.out,
                  "finish_reason": sequence.finish_reason, "prompt_tokens": len(job.prompt_ids),
                  "completion_tokens": len(sequence.generated) + sequence.end_of_text})

    def _fail(self, job: Job, status: int, message: str) -> None:
        if job.ended:
            return
        job.ended = True
        self.stats.failed += 1
        job.emit({"type": "error", "status": status, "message": message})

    def _fail_everything(self, arrivals: list[Job], message: str) -> None:
        for job in [*arrivals, *(job for lane in [self.shared, *self.lanes] if lane for job in lane.jobs)]:
            self._fail(job, 500, message)
        self.shared, self.lanes = None, []

    # ------------------------------------------------------------ logprobs in the OpenAI completions shape

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _token_logprobs(self, logits: torch.Tensor, token: int, top: int) -> dict:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return {"logprob": float(log_probs[token]), "top": self._top(log_probs, top),
                "token_text": self._token_text(token)}

    def _top(self, log_probs: torch.Tensor, k: int) -> dict[str, float]:
        if k <= 0:
            return {}
        values, indices = log_probs.topk(k)
        out: dict[str, float] = {}
        for v, i in zip(values.tolist(), indices.tolist()):
            out.setdefault(self._token_text(i), v)  # two ids can decode to one string: keep the likelier
        return out

    def _prompt_logprobs(self, logits: torch.Tensor, prompt: list[int], top: int | None) -> list[dict]:
        """The first prompt token has no logprob (nothing precedes it), as in the OpenAI API."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        entries = [{"token": prompt[0], "logprob": None, "top": None}]
        for pos in range(1, len(prompt)):
            row = log_probs[pos - 1]
            entries.append({"token": prompt[pos], "logprob": float(row[prompt[pos]]),
                            "top": self._top(row, top or 0)})
        return entries

