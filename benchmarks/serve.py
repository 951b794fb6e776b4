"""Serving: cross-expert continuous batching vs one request at a time, memory per expert, and a fuzz run.

Every figure comes from real `expertkit serve` processes on 127.0.0.1, measured in this one run:
- load: concurrent completions (exactly 64 new tokens each: `ignore_eos`; 200 on the micro base, 64 on a real
  checkpoint) spread over 4 experts, sent to a server that batches across experts (--max-batch 64), to the
  same server answering one request at a time (--max-batch 1, so each request runs alone with its own
  adapter), and the same prompts to a server of the bare base (no adapter loaded): the ceiling a
  multi-adapter server can at best reach. The bare base's and the batched servers run side by side, their loads
  alternated over LOAD_ROUNDS rounds after a warm-up (the median round of each; engine counters over all loads);
- memory: resident memory of the server with 4 experts vs the same server with the base only,
  against the 4 adapters' file sizes;
- exactness: a sample of the batched answers against PEFT alone on their expert (fresh model, same
  greedy tokens), counted as "mismatches" (must be 0);
- fuzz: 500 malformed or hostile requests; every answer must be a 4xx, the server must stay up and
  its resident memory must grow by less than 10%.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from common import suite_config
from serve_live import MIX_TARGET, live_reload, mix_load
from serve_llamacpp import AGREEMENT_TARGET, available, llamacpp_rows
from suites import MICRO, REAL_BASES, suite

REQUESTS = {MICRO: 200}  # concurrent requests under load per base
REAL_REQUESTS = 64
LOAD_ROUNDS = 3  # alternated measured loads of the bare base and the batched experts (median)
NEW_TOKENS = 64
SERVE_DOMAINS = ("medical", "code", "news", "science")  # 4 experts on a real checkpoint
N_EXPERTS = 4
N_FUZZ = 500
N_CHECKED = 24  # answers under load compared with PEFT alone
PROMPT_CHARS = 120
SPEEDUP_TARGET = 3.0
BARE_BASE_TARGET = 0.85  # batched mixed-adapter throughput vs the bare base serving the same batch
MEMORY_SLACK = 0.20
FUZZ_GROWTH_LIMIT = 0.10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(library: Path, models: list[str], max_batch: int, device: str | None, max_queue: int,
           extra: tuple[str, ...] = ()):
    """An `expertkit serve` process; yields (url, psutil.Process). Stopped on exit, whatever happens.

    Its stderr goes to a file, not a pipe: nobody reads a pipe while the load runs, and a server that fills one
    (64 KiB of warnings) blocks on its next write, which looks like a server that never answers."""
    port = free_port()
    cli = Path(sys.executable).parent / "expertkit"
    args = [str(cli), "serve", str(library), "--port", str(port), "--max-batch", str(max_batch),
            "--max-queue", str(max_queue), "--max-tokens", str(NEW_TOKENS), *extra]
    args += [a for m in models for a in ("--model", m)] + (["--device", device] if device else [])
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {_tail(log)}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in 180 s: {_tail(log)}")
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _tail(log, chars: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def prompts_for(cfg, experts: list[str], n: int) -> list[tuple[str, str]]:
    """n (expert, prompt) pairs, round-robin over the experts; prompts are consecutive slices of test text."""
    from expertkit.data import load_corpus

    slices = {}
    for e in experts:
        text = " ".join(ex.full_text for ex in load_corpus(cfg.domain(e)).splits["test"])
        slices[e] = [text[i:i + PROMPT_CHARS] for i in range(0, len(text) - PROMPT_CHARS, PROMPT_CHARS)]
    return [(experts[i % len(experts)], slices[experts[i % len(experts)]][i // len(experts)]) for i in range(n)]


async def _load(url: str, requests: list[tuple[str, str]], started: asyncio.Event | None = None) -> dict:
    limits = httpx.Limits(max_connections=len(requests) + 10, max_keepalive_connections=len(requests) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(model: str, prompt: str):
            start = time.perf_counter()
            reply = await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                                "max_tokens": NEW_TOKENS, "temperature": 0,
                                                                "ignore_eos": True})
            elapsed = (time.perf_counter() - start) * 1000
            ok = reply.status_code == 200
            tokens = reply.json()["usage"]["completion_tokens"] if ok else 0
            return reply.status_code, elapsed, tokens, reply.json()["choices"][0]["text"] if ok else None

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(m, p)) for m, p in requests]
        if started is not None:
            started.set()
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    latencies = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    return {"errors": sum(r[0] != 200 for r in results), "tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1), "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
            "texts": [r[3] for r in results]}


def alternate(loads: dict[str, tuple[str, list[tuple[str, str]]]], rounds: int) -> dict[str, list[dict]]:
    """{name: its runs}: each named (url, requests) load once per round, in turn, so that every load sees the
    same drift of a shared CPU."""
    runs = {name: [] for name in loads}
    for _ in range(rounds):
        for name, (target, prompts) in loads.items():
            runs[name].append(asyncio.run(_load(target, prompts)))
    return runs


def side_by_side(bare_url: str, url: str, requests: list[tuple[str, str]]) -> dict:
    """The bare base's server and the experts' server on the same prompts (the bare base answers each as
    itself), alternated round by round after one unmeasured load on each: the throughput of a shared CPU drifts
    by about 10% over minutes, and a first load also pays for the server's allocations, so one cold run of each
    in turn measures the order more than the servers. Each gets the run of its median throughput, with every
    round's figure beside it; the texts are those of its first round."""
    loads = {"bare_base": (bare_url, [("base", p) for _, p in requests]), "batched": (url, requests)}
    alternate(loads, 1)  # the warm-up, not measured
    runs = alternate(loads, LOAD_ROUNDS)
    out = {}
    for name, (target, _) in loads.items():
        median = sorted(runs[name], key=lambda r: r["tok_s"])[len(runs[name]) // 2]
        out[name] = {**median, "texts": runs[name][0]["texts"], "rounds_tok_s": [r["tok_s"] for r in runs[name]],
                     "errors": sum(r["errors"] for r in runs[name]), "engine": engine_metrics(target)}
    out["bare_base"].pop("texts")
    return out


def peft_solo_ids(library, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy ids) of each (expert, prompt) answered alone by PEFT on a fresh copy of the base:
    NEW_TOKENS tokens, EOS ignored."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertkit.encoding import encode_texts
    from expertkit.runtime.hf_cache import cache_keyword, returned_cache

    base_dir = library.base_identity()["name"]
    tokenizer, models, answers = AutoTokenizer.from_pretrained(base_dir), {}, []
    for expert, prompt in requests:
        if expert not in models:
            models[expert] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                                       str(library.get(expert).path)).eval()
        prompt_ids = encode_texts(tokenizer, [prompt])[0]
        ids, generated, past = torch.tensor([prompt_ids]), [], None
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                out = models[expert](input_ids=ids, use_cache=True, **{cache_keyword(models[expert]): past})
                past, ids = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(int(ids))
        answers.append((prompt_ids, generated))
    return answers


def peft_solo_texts(library, requests: list[tuple[str, str]]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(library.base_identity()["name"])
    return [tokenizer.decode(generated) for _, generated in peft_solo_ids(library, requests)]


def mismatches(library, requests: list[tuple[str, str]], texts: list[str | None]) -> dict:
    """Served answers under load vs PEFT alone, on a sample that covers every expert."""
    sample = sorted(random.Random(0).sample(range(len(requests)), min(N_CHECKED, len(requests))))
    solo = peft_solo_texts(library, [requests[i] for i in sample])
    wrong = [i for i, expected in zip(sample, solo) if texts[i] != expected]
    return {"checked": len(sample), "mismatches": len(wrong), "mismatched_requests": wrong}


def engine_metrics(url: str) -> dict:
    """The server's own gauges (steps, mean rows per step, prefills ...) from GET /metrics."""
    wanted = ("expertkit_decode_steps", "expertkit_mean_batch_rows", "expertkit_prefills",
              "expertkit_generated_tokens")
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return {name: round(float(line.split()[-1]), 2) for line in lines for name in wanted
            if line.startswith(name + " ")}


def hostile_requests(n: int, models: list[str], seed: int = 0) -> list[tuple[str, bytes, dict]]:
    """(path, body, headers) triples: malformed JSON, wrong types, absurd or non-finite numbers, unknown fields,
    path-like model names, 1 MB prompts, bad token ids, oversize bodies, bad chat messages."""
    rng = random.Random(seed)
    json_headers = {"Content-Type": "application/json"}
    model = lambda: rng.choice(models)
    makers = [
        lambda: ("/v1/completions", b'{"model": "' + model().encode() + b'", "prompt": ', json_headers),
        lambda: ("/v1/completions", rng.randbytes(rng.randint(1, 400)), json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi", "max_tokens": -rng.randint(1, 10**6)
                                                }).encode(), json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi", "max_tokens": 10**rng.randint(5, 80)
                                                }).encode(), json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi",
                                                "temperature": rng.choice([-1, 1e308, "hot", None, [1]])}).encode(),
                 json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi", f"x_{rng.randint(0, 99)}": 1}
                                               ).encode(), json_headers),
        lambda: ("/v1/completions", json.dumps({"model": rng.choice(["../../etc/passwd", "/tmp/adapter",
                                                                     "..\\evil", "experts/code", "C:\\x", "~/.ssh"]),
                                                "prompt": "hi"}).encode(), json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "x" * 1_000_000}).encode(), json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": [rng.randint(10**6, 10**9)]}).encode(),
                 json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi", "logprobs": 10**9}).encode(),
                 json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi", "n": rng.randint(2, 100)}).encode(),
                 json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": "hi", "stop": ["s"] * 100}).encode(),
                 json_headers),
        lambda: ("/v1/completions", json.dumps(rng.choice([[], "text", 42, None, {"prompt": "no model"}])).encode(),
                 json_headers),
        lambda: ("/v1/completions", json.dumps({"model": model(), "prompt": [[1, 2], "mixed", 3]}).encode(),
                 json_headers),
        lambda: ("/v1/completions", b"x" * (5 * 2**20), json_headers),
        lambda: ("/v1/chat/completions", json.dumps({"model": model(), "messages": [{"role": "wizard",
                                                                                    "content": "hi"}]}).encode(),
                 json_headers),
        lambda: ("/v1/chat/completions", json.dumps({"model": model(), "messages": []}).encode(), json_headers),
        lambda: ("/v1/chat/completions", json.dumps({"model": model(), "messages": "hello",
                                                     "max_tokens": "many"}).encode(), json_headers),
        lambda: ("/v1/chat/completions", json.dumps({"model": model(), "messages": [{"role": "user",
                                                                                    "content": "y" * 1_000_000}]}
                                                    ).encode(), json_headers),
        lambda: ("/v1/completions", b'{"model": "base", "prompt": "hi", "seed": 1e999}', json_headers),
        # numbers that JSON itself lacks but Python's reader takes
        lambda: ("/v1/completions", ('{"model": "%s", "prompt": "hi", "%s": %s}' % (
            model(), rng.choice(["temperature", "top_p", "alpha", "threshold"]),
            rng.choice(["NaN", "Infinity", "-Infinity"]))).encode(), json_headers),
    ]
    return [makers[i % len(makers)]() for i in range(n)]


async def _fuzz(url: str, requests) -> dict:
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        semaphore = asyncio.Semaphore(16)

        async def one(path, body, headers):
            async with semaphore:
                try:
                    return (await client.post(path, content=body, headers=headers)).status_code
                except httpx.HTTPError:
                    return -1  # connection dropped: counts as a failure

        for status in await asyncio.gather(*(one(*r) for r in requests)):
            statuses[status] = statuses.get(status, 0) + 1
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())},
            "non_4xx": sum(v for k, v in statuses.items() if not 400 <= k < 500)}


def adapter_bytes(library, experts: list[str]) -> int:
    return sum(f.stat().st_size for e in experts for f in library.get(e).path.glob("adapter_model.*"))


def warm_rss(url: str, process: psutil.Process) -> float:
    httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "warm up", "max_tokens": 8}, timeout=60)
    return rss_mib(process)


def print_table(result: dict) -> None:
    load, memory, fuzz = result["load"], result["memory"], result["fuzz"]
    print(f"\n| serving {result['base_model']} ({result['requests']} requests x {NEW_TOKENS} tokens, {N_EXPERTS} "
          "experts) | tok/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|")
    for name in ("batched", "sequential", "bare_base"):
        row = load[name]
        print(f"| {name} | {row['tok_s']} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} |")
    exactness = result["exactness"]
    print(f"exactness under load: {exactness['mismatches']} of {exactness['checked']} sampled answers differ from "
          "PEFT alone on their expert")
    print(f"speedup {result['speedup']:.2f}x (target >= {SPEEDUP_TARGET}x); batched engine: "
          f"{load['batched']['engine']}")
    print(f"batched mixed-adapter vs bare base: {result['vs_bare_base']:.2f}x (target >= {BARE_BASE_TARGET}x)")
    print(f"memory: base only {memory['base_only_mib']:.1f} MiB, with {N_EXPERTS} experts "
          f"{memory['with_experts_mib']:.1f} MiB: +{memory['growth_mib']:.2f} MiB vs adapters "
          f"{memory['adapter_mib']:.2f} MiB (limit {memory['limit_mib']:.2f} MiB)")
    mixes, live = result["mixes"], result["live_reload"]
    print(f"mixes: a quarter of the requests 2-expert mixes {mixes['mixed_tok_s']} tok/s vs all single-expert "
          f"{mixes['single_tok_s']} tok/s: {mixes['mix_ratio']:.2f}x (target >= {MIX_TARGET}x), "
          f"errors {mixes['errors']}")
    print(f"live reload under load ({live['in_flight']} requests in flight; '{live['rewritten']}' rewritten, "
          f"'{live['added']}' added): errors {live['errors']}, stale answers {live['stale_answers']} of "
          f"{live['checked']} checked")
    llama = result["llamacpp"]
    if "skipped" in llama:
        print(f"llama.cpp side by side: skipped ({llama['skipped']})")
    else:
        ours, theirs = llama["expertkit"], llama["llamacpp"]
        print(f"llama.cpp side by side ({llama['setup']}): top-1 agreement {llama['llamacpp_agreement']:.2%} of "
              f"{llama['agreement']['f32']['positions']} positions on the base dequantized to F32 (target >= "
              f"{AGREEMENT_TARGET:.0%}), {llama['llamacpp_agreement_quantized_base']:.2%} on its quantized GGUF; "
              "1 request "
              f"{ours['single']['tok_s']} vs {theirs['single']['tok_s']} tok/s ({llama['single_ratio']:.2f}x); "
              f"{theirs['mixed16']['requests']} requests on 4 adapters {ours['mixed16']['tok_s']} vs "
              f"{theirs['mixed16']['tok_s']} tok/s ({llama['mixed16_ratio']:.2f}x)")
    print(f"fuzz: {N_FUZZ} requests -> statuses {fuzz['statuses']}; non-4xx {fuzz['non_4xx']}; server up "
          f"{fuzz['server_up']}; memory {fuzz['rss_before_mib']:.1f} -> {fuzz['rss_after_mib']:.1f} MiB "
          f"({fuzz['rss_growth']:+.1%})")


@suite("serve", bases=(MICRO, *REAL_BASES))
def run(data: Path, device: str | None, base_name: str = MICRO) -> dict:
    from expertkit.library import Kind, Library
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    cfg, base = load_project_base(suite_config(data, base_name, SERVE_DOMAINS), device)
    train_all(cfg, base)
    library = Library(cfg.library)
    experts = [e.name for e in library.entries(Kind.EXPERT)][:N_EXPERTS]
    n_requests = REQUESTS.get(base_name, REAL_REQUESTS)
    requests = prompts_for(cfg, experts, n_requests)
    del base

    result: dict = {"base_model": base_name, "experts": experts, "requests": n_requests, "new_tokens": NEW_TOKENS,
                    "load": {}}
    serve = lambda models, max_batch: server(library.root, models, max_batch, device, n_requests + 50)
    with serve(["base"], 64) as (bare_url, bare_process), serve(experts, 64) as (url, process):
        base_only, with_experts = warm_rss(bare_url, bare_process), warm_rss(url, process)
        result["load"].update(side_by_side(bare_url, url, requests))
        batched_texts = result["load"]["batched"].pop("texts")
        result["mixes"] = mix_load(url, requests, experts)
        missing = "the micro base has no GGUF" if base_name == MICRO else available()
        result["llamacpp"] = {"skipped": missing} if missing else llamacpp_rows(library, url, requests, NEW_TOKENS,
                                                                                 peft_solo_ids)
        before = rss_mib(process)
        fuzz = asyncio.run(_fuzz(url, hostile_requests(N_FUZZ, experts + ["base", "auto"])))
        up = httpx.get(url + "/health", timeout=10).status_code == 200
        after = rss_mib(process)
    with serve(experts, 1) as (url, process):
        result["load"]["sequential"] = {**asyncio.run(_load(url, requests)), "engine": engine_metrics(url)}
        result["load"]["sequential"].pop("texts")
    exactness = mismatches(library, requests, batched_texts)
    result["live_reload"] = live_reload(library, experts, requests, lambda root, models, extra: server(
        root, models, 64, device, n_requests + 50, extra))

    adapters = adapter_bytes(library, experts) / 2**20
    batched, sequential = result["load"]["batched"], result["load"]["sequential"]
    result.update({
        "errors": batched["errors"] + sequential["errors"],
        "mismatches": exactness["mismatches"], "exactness": exactness,
        "batched_tok_s": batched["tok_s"], "sequential_tok_s": sequential["tok_s"],
        "bare_base_tok_s": result["load"]["bare_base"]["tok_s"],
        "speedup": round(batched["tok_s"] / sequential["tok_s"], 2),
        "vs_bare_base": round(batched["tok_s"] / result["load"]["bare_base"]["tok_s"], 2),
        "rss_growth_bytes": round((with_experts - base_only) * 2**20),
        "adapter_bytes": adapter_bytes(library, experts),
        "mix_ratio": result["mixes"]["mix_ratio"], "reload_errors": result["live_reload"]["errors"],
        "stale_answers": result["live_reload"]["stale_answers"],
        **{k: result["llamacpp"][k] for k in ("llamacpp_agreement", "llamacpp_agreement_quantized_base",
                                              "single_ratio", "mixed16_ratio")
           if k in result["llamacpp"]},
        "p50_ms": batched["p50_ms"], "p99_ms": batched["p99_ms"],
        "memory": {"base_only_mib": round(base_only, 2), "with_experts_mib": round(with_experts, 2),
                   "growth_mib": round(with_experts - base_only, 2), "adapter_mib": round(adapters, 2),
                   "limit_mib": round(adapters * (1 + MEMORY_SLACK), 2)},
        "fuzz": {**fuzz, "requests": N_FUZZ, "server_up": up, "rss_before_mib": round(before, 2),
                 "rss_after_mib": round(after, 2), "rss_growth": round(after / before - 1, 4)},
    })
    result["checks"] = {
        "no_errors": result["errors"] == 0,
        "no_mismatches": result["mismatches"] == 0,
        "speedup": result["speedup"] >= SPEEDUP_TARGET,
        "vs_bare_base": result["vs_bare_base"] >= BARE_BASE_TARGET,
        "memory": result["memory"]["growth_mib"] <= result["memory"]["limit_mib"],
        "fuzz_only_4xx": fuzz["non_4xx"] == 0 and up,
        "fuzz_memory": result["fuzz"]["rss_growth"] < FUZZ_GROWTH_LIMIT,
        "mix_ratio": result["mix_ratio"] >= MIX_TARGET and result["mixes"]["errors"] == 0,
        "live_reload": result["reload_errors"] == 0 and result["stale_answers"] == 0,
    }
    if "llamacpp_agreement" in result:
        result["checks"]["llamacpp_agreement"] = result["llamacpp_agreement"] >= AGREEMENT_TARGET
        result["checks"]["beats_llamacpp_mixed16"] = result["mixed16_ratio"] > 1.0
    print_table(result)
    print("checks:", result["checks"])
    return result
