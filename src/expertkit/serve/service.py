"""Answering OpenAI requests from the local engine: limits, tokenization, and the response shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse

from expertkit.compose.adapters import is_mix, mix_composition, single_adapters
from expertkit.errors import ExpertkitError
from expertkit.runtime import SamplingParams
from expertkit.runtime.tokens import encode_prompts
from expertkit.serve.engine import Engine, Job, QueueFull
from expertkit.serve.protocol import ChatRequest, CompletionRequest, OpenAIError
from expertkit.serve.text import chat_prompt

log = logging.getLogger("expertkit.serve")

EXPERT_HEADER = "X-Expertkit-Expert"
AUTO = "auto"
MAX_MIXES = 256  # distinct weighted mixes a server holds; a mix used often is better pinned as a merge


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_tokens: int
    max_prompt_chars: int = 200_000  # checked before tokenizing, so a huge body costs nothing
    default_max_tokens: int = 16


class LocalService:
    """The models of one library, decoded by an Engine in this process."""

    def __init__(self, engine: Engine, limits: Limits, context_length: int | None, router: str | None,
                 reloader=None, watch_s: float | None = None):
        self.engine, self.limits, self.router = engine, limits, router
        self.context_length = context_length
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.reloader = reloader  # serve/server.py's LibraryReloader, or None (a fixed set of models)
        if reloader is not None and watch_s:
            threading.Thread(target=self._watch, args=(watch_s,), name="expertkit-library-watch", daemon=True).start()

    # ------------------------------------------------------------ a live library

    def _reload_now(self) -> dict:
        """Reload in the engine thread and wait for it (any thread but the engine's)."""
        report = self.engine.call(self.reloader.reload).result(timeout=600)
        self.router = report["router"]
        log.info("library reloaded: %s", {k: v for k, v in report.items() if v})
        return report

    async def reload_library(self) -> dict:
        if self.reloader is None:
            raise OpenAIError(400, "this server does not serve a library it can reload")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._reload_now)
        except ExpertkitError as e:
            raise OpenAIError(409, f"library not reloaded: {e}", code="reload_refused") from None

    def _watch(self, every_s: float) -> None:
        while self.engine.running:
            time.sleep(every_s)
            try:
                if self.engine.running and self.reloader.changed():
                    self._reload_now()
            except ExpertkitError as e:
                log.warning("library not reloaded: %s (tried again at the next check)", e)
                self.reloader.signature = None

    # ------------------------------------------------------------ what is served

    def model_names(self) -> list[str]:
        names = [n for n in self.engine.compositions if not is_mix(n)]
        return names + [AUTO] if self.router else names

    def resolve(self, model: str) -> str:
        if model == AUTO and self.router:
            return self.router
        if model in self.engine.compositions:
            return model
        if is_mix(model):
            return self._mix(model)
        raise OpenAIError(404, f"model '{model}' does not exist; available: {self.model_names()}",
                          code="model_not_found", param="model")

    def _mix(self, spec: str) -> str:
        """A weighted mix of served adapters, made on first use and kept (its rows batch with all others)."""
        try:
            composition = mix_composition(self.engine.pool, spec, single_adapters(self.engine.compositions))
        except ExpertkitError as e:
            raise OpenAIError(400, str(e), param="model") from None
        if composition.name not in self.engine.compositions:
            if sum(map(is_mix, self.engine.compositions)) >= MAX_MIXES:
                raise OpenAIError(400, f"this server already holds {MAX_MIXES} distinct mixes; reuse one, or pin a "
                                       "frequent mix as a merge (expertkit merge --method linear)", param="model")
            self.engine.compositions[composition.name] = composition
        return composition.name

    def health(self) -> dict:
        return {"status": "ok", "models": len(self.model_names()), "queue": self.engine.queue_depth,
                "active": self.engine.active_rows}

    def gauges(self) -> dict[str, tuple[str, float]]:
        stats = self.engine.stats
        return {
            "expertkit_queue_depth": ("Requests waiting to join the batch.", self.engine.queue_depth),
            "expertkit_active_rows": ("Requests decoding now.", self.engine.active_rows),
            "expertkit_generated_tokens": ("Tokens generated since start.", stats.generated_tokens),
            "expertkit_prompt_tokens": ("Prompt tokens prefilled since start.", stats.prompt_tokens),
            "expertkit_decode_steps": ("Batched decoding steps since start.", stats.steps),
            "expertkit_prefills": ("Prefill forwards since start (newcomers join in groups).", stats.prefills),
            "expertkit_mean_batch_rows": ("Mean rows per decoding step.", stats.rows_stepped / max(stats.steps, 1)),
            "expertkit_routed_requests": ("Requests a router decided since start.", stats.routed),
            "expertkit_abstain_rate": ("Share of routed requests sent to the base because no expert was confident "
                                       "enough.", stats.abstained / max(stats.routed, 1)),
        }

    # ------------------------------------------------------------ requests

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if len(prompt) > self.limits.max_prompt_chars:
                raise OpenAIError(400, f"prompt has {len(prompt)} characters; the limit is "
                                       f"{self.limits.max_prompt_chars}", code="context_length_exceeded",
                                  param="prompt")
            return encode_prompts(self.tokenizer, [prompt])[0]
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                              param="prompt")
        return list(prompt)

    def _check_lengths(self, ids: list[int], new_tokens: int) -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise OpenAIError(400, f"prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}",
                              code="context_length_exceeded", param="prompt")
        if new_tokens > self.limits.max_tokens:
            raise OpenAIError(400, f"max_tokens {new_tokens} is over this server's limit of {self.limits.max_tokens}",
                              param="max_tokens")
        if self.context_length and len(ids) + new_tokens > self.context_length:
            raise OpenAIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({new_tokens}) exceeds the model's "
                                   f"context of {self.context_length}", code="context_length_exceeded",
                              param="max_tokens")

    def _params(self, req, new_tokens: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return SamplingParams(max_new_tokens=new_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed,
                              stop=tuple(req.stop) + extra_stops)

    async def completion(self, req: CompletionRequest):
        composition = self.resolve(req.model_name)
        new_tokens = req.max_tokens if req.max_tokens is not None else self.limits.default_max_tokens
        prompts = [self._prompt_ids(p) for p in req.prompts()]
        for ids in prompts:
            self._check_lengths(ids, new_tokens)
        want_logprobs = req.logprobs is not None
        jobs = [dict(composition=composition, prompt_ids=ids, params=self._params(req, new_tokens),
                     top_logprobs=req.logprobs, prompt_logprobs=req.echo and want_logprobs, ignore_eos=req.ignore_eos,
                     composition_params=req.composition_params)
                for ids in prompts]
        run = await Run.start(self.engine, jobs, req.stream)
        shape = CompletionShape(self.tokenizer, req, prompts)
        return await run.respond(shape, req.stream, req.include_usage)

    async def chat(self, req: ChatRequest):
        composition = self.resolve(req.model_name)
        new_tokens = req.new_tokens if req.new_tokens is not None else self.limits.max_tokens
        text, template_stops = chat_prompt(self.tokenizer, req.as_dicts())
        ids = self._prompt_ids(text)
        if req.new_tokens is None:  # OpenAI's default: as many as the context leaves
            room = (self.context_length or len(ids) + new_tokens) - len(ids)
            new_tokens = max(min(new_tokens, room), 0)
        self._check_lengths(ids, new_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [dict(composition=composition, prompt_ids=ids, params=self._params(req, new_tokens, template_stops),
                     top_logprobs=top, ignore_eos=req.ignore_eos, composition_params=req.composition_params)]
        run = await Run.start(self.engine, jobs, req.stream)
        return await run.respond(ChatShape(req), req.stream, req.include_usage)


class EventSink:
    """Carries engine events into asyncio queues with one event-loop wake-up per burst.

    The engine thread emits an event per token per row; waking the loop for each one would have
    the HTTP side and the engine fight over the GIL at every step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.scheduled = False

    def put(self, queue: asyncio.Queue, items: list) -> None:
        with self.lock:
            self.items.extend((queue, item) for item in items)
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_SINKS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventSink]" = weakref.WeakKeyDictionary()


def sink_for(loop: asyncio.AbstractEventLoop) -> EventSink:
    if loop not in _SINKS:
        _SINKS[loop] = EventSink(loop)
    return _SINKS[loop]


class Run:
    """The jobs of one request in the engine, and the events coming back to this request's event loop."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.events: asyncio.Queue = asyncio.Queue()
        self.experts: list[str | None] = [None] * len(jobs)

    def _emitter(self, index: int, sink: EventSink, streaming: bool):
        """The job's `emit`: a whole (non-streamed) answer is delivered in one go when it ends."""
        held: list = []

        def emit(event: dict) -> None:
            if not streaming and event["type"] in ("token", "prompt_logprobs"):
                held.append((index, event))
                return
            sink.put(self.events, [*held, (index, event)])
            held.clear()

        return emit

    @classmethod
    async def start(cls, engine: Engine, job_kwargs: list[dict], streaming: bool) -> "Run":
        sink = sink_for(asyncio.get_running_loop())
        run = cls(engine, [])
        run.experts = [None] * len(job_kwargs)
        for index, kwargs in enumerate(job_kwargs):
            run.jobs.append(Job(emit=run._emitter(index, sink, streaming), streaming=streaming, **kwargs))
        try:
            for job in run.jobs:
                engine.submit(job)
        except QueueFull as e:
            run.cancel()
            raise OpenAIError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        except ExpertkitError as e:  # a parameter this model does not take (alpha for 'base', say)
            run.cancel()
            raise OpenAIError(400, str(e), param=next(iter(job_kwargs[0].get("composition_params") or {}), None)) \
                from None
        return run

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    async def _until_started(self) -> list[tuple[int, dict]]:
        """Wait for every job's routing decision (headers need it); keep other early events for later."""
        early, started = [], set()
        while len(started) < len(self.jobs):
            index, event = await self.events.get()
            if event["type"] == "error":
                self.cancel()
                raise engine_error(event)
            if event["type"] == "start":
                started.add(index)
                self.experts[index] = event["expert"]
            else:
                early.append((index, event))
        return early

    def headers(self) -> dict:
        experts = [e for e in self.experts if e]
        return {EXPERT_HEADER: ",".join(experts)} if experts else {}

    async def _events(self, early):
        """Every event until each job has ended, starting with those that came before the last start."""
        ended = 0
        for index, event in early:
            ended += event["type"] in ("end", "error")
            yield index, event
        while ended < len(self.jobs):
            index, event = await self.events.get()
            ended += event["type"] in ("end", "error")
            yield index, event

    async def respond(self, shape, stream: bool, include_usage: bool):
        early = await self._until_started()
        if not stream:
            try:
                async for index, event in self._events(early):
                    if event["type"] == "error":
                        raise engine_error(event)
                    shape.add(index, event)
            finally:
                self.cancel()
            body = shape.body(self.experts)
            return JSONResponse(body, headers=self.headers())
        return StreamingResponse(self._sse(shape, early, include_usage), media_type="text/event-stream",
                                 headers={**self.headers(), "Cache-Control": "no-cache"})

    async def _sse(self, shape, early, include_usage: bool):
        try:
            for chunk in shape.first_chunks(self.experts):
                yield _sse(chunk)
            async for index, event in self._events(early):
                if event["type"] == "error":
                    yield _sse(engine_error(event).body())
                    continue
                chunk = shape.chunk(index, event, self.experts)
                if chunk is not None:
                    yield _sse(chunk)
            if include_usage:
                yield _sse(shape.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop decoding for it
            self.cancel()


def engine_error(event: dict) -> OpenAIError:
    """An engine error event as the OpenAI error a client reads: the request's fault (4xx) or ours (5xx)."""
    status = event["status"]
    return OpenAIError(status, event["message"], type_="server_error" if status >= 500 else "invalid_request_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Shape:
    """Accumulates one request's events into the OpenAI response (or its streamed chunks)."""

    object_name = ""
    id_prefix = ""

    def __init__(self, req, n_choices: int):
        self.req, self.model = req, req.model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.texts = [""] * n_choices
        self.finish = [None] * n_choices
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.token_events: list[list[dict]] = [[] for _ in range(n_choices)]

    def _record(self, index: int, event: dict) -> None:
        if event["type"] == "token":
            self.token_events[index].append(event)
        elif event["type"] == "end":
            self.texts[index] = event["full_text"]
            self.finish[index] = event["finish_reason"]
            self.usage["prompt_tokens"] += event["prompt_tokens"]
            self.usage["completion_tokens"] += event["completion_tokens"]

    def add(self, index: int, event: dict) -> None:
        self._record(index, event)

    def usage_body(self) -> dict:
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}

    def envelope(self, choices: list[dict], experts, chunk: bool) -> dict:
        body = {"id": self.id, "object": self.object_name + (".chunk" if chunk and self.object_name.startswith(
            "chat") else ""), "created": self.created, "model": self.model, "choices": choices}
        if any(experts):
            body["expert"] = experts[0] if len(experts) == 1 else ",".join(e or "" for e in experts)
        return body

    def usage_chunk(self) -> dict:
        return {**self.envelope([], [], chunk=True), "usage": self.usage_body()}


class CompletionShape(_Shape):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, tokenizer, req: CompletionRequest, prompts: list[list[int]]):
        super().__init__(req, len(prompts))
        self.tokenizer, self.prompts = tokenizer, prompts
        self.prompt_entries: list[list[dict]] = [[] for _ in prompts]

    def _prompt_text(self, index: int) -> str:
        prompt = self.req.prompts()[index]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def add(self, index: int, event: dict) -> None:
        if event["type"] == "prompt_logprobs":
            self.prompt_entries[index] = event["entries"]
        self._record(index, event)

    def _logprobs(self, entries: list[dict], offset: int) -> dict:
        tokens = [self.tokenizer.decode([e["token"]]) for e in entries]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": offsets}

    def body(self, experts) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            prefix = self._prompt_text(i) if self.req.echo else ""
            logprobs = None
            if self.req.logprobs is not None:
                logprobs = self._logprobs(self.prompt_entries[i] + self.token_events[i], 0)
            choices.append({"index": i, "text": prefix + text, "logprobs": logprobs,
                            "finish_reason": self.finish[i]})
        return {**self.envelope(choices, experts, chunk=False), "usage": self.usage_body()}

    def first_chunks(self, experts) -> list[dict]:
        if not self.req.echo:
            return []
        return [self.envelope([{"index": i, "text": self._prompt_text(i), "logprobs": None, "finish_reason": None}],
                              experts, chunk=True) for i in range(len(self.texts))]

    def chunk(self, index: int, event: dict, experts) -> dict | None:
        self.add(index, event)
        if event["type"] == "token":
            logprobs = self._logprobs([event], 0) if self.req.logprobs is not None else None
            choice = {"index": index, "text": event["text"], "logprobs": logprobs, "finish_reason": None}
        elif event["type"] == "end":
            choice = {"index": index, "text": event["text"], "logprobs": None,
                      "finish_reason": event["finish_reason"]}
        else:
            return None
        return self.envelope([choice], experts, chunk=True)


class ChatShape(_Shape):
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(self, req: ChatRequest):
        super().__init__(req, 1)

    def _logprobs(self, events: list[dict]) -> dict | None:
        if not self.req.logprobs:
            return None
        content = []
        for e in events:
            token = e["token_text"]
            top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in e["top"].items()]
            content.append({"token": token, "logprob": e["logprob"], "bytes": list(token.encode()),
                            "top_logprobs": top})
        return {"content": content}

    def body(self, experts) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": self.texts[0]},
                  "logprobs": self._logprobs(self.token_events[0]), "finish_reason": self.finish[0]}
        return {**self.envelope([choice], experts, chunk=False), "usage": self.usage_body()}

    def first_chunks(self, experts) -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self.envelope([choice], experts, chunk=True)]

    def chunk(self, index: int, event: dict, experts) -> dict | None:
        self.add(index, event)
        if event["type"] == "token":
            choice = {"index": 0, "delta": {"content": event["text"]}, "logprobs": self._logprobs([event]),
                      "finish_reason": None}
        elif event["type"] == "end":
            choice = {"index": 0, "delta": {"content": event["text"]} if event["text"] else {}, "logprobs": None,
                      "finish_reason": event["finish_reason"]}
        else:
            return None
        return self.envelope([choice], experts, chunk=True)
