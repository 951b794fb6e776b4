"""The serve suite's rows for weighted mixes and the live library, on real `expertkit serve` processes.

- mixes: the same concurrent load with a quarter of the requests turned into 2-expert mixes
  (`mix:a=0.5,b=0.5`) vs all single-expert, alternated twice on one server: throughput ratio.
- live reload under load: a copy of the experts is served with an admin key; once a wave of requests
  has been admitted, one expert is rewritten (another's weights) and one added, and the library is
  reloaded over HTTP. Every answer of the wave on the rewritten expert must equal PEFT alone on the
  old weights; every answer after the reload, PEFT alone on the new ones ("stale answers" otherwise).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx

MIX_SHARE = 4  # every 4th request is a mix
MIX_TARGET = 0.8
ADMIN = "benchmark-admin"
ADDED = "added-expert"
WAVE = 64  # the server's --max-batch


def mix_requests(requests: list[tuple[str, str]], experts: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, (model, prompt) in enumerate(requests):
        if i % MIX_SHARE == 0:
            other = experts[(experts.index(model) + 1) % len(experts)]
            model = f"mix:{model}=0.5,{other}=0.5"
        out.append((model, prompt))
    return out


def mix_load(url: str, requests: list[tuple[str, str]], experts: list[str]) -> dict:
    """Throughput with a quarter of the requests mixes vs none, alternated (single, mixed, single, mixed)."""
    from serve import alternate

    runs = alternate({"single": (url, requests), "mixed": (url, mix_requests(requests, experts))}, 2)
    tok_s = {k: sum(r["tok_s"] for r in v) / len(v) for k, v in runs.items()}
    return {"single_tok_s": round(tok_s["single"], 1), "mixed_tok_s": round(tok_s["mixed"], 1),
            "mix_ratio": round(tok_s["mixed"] / tok_s["single"], 3),
            "errors": sum(r["errors"] for v in runs.values() for r in v), "mixed_requests": len(requests) // MIX_SHARE}


def copy_experts(library, experts: list[str], root: Path):
    """A library at `root` holding copies of `experts` (adapters only: cheap, and the cache stays untouched)."""
    from expertkit.library import Library

    live = Library(root)
    live.create_or_check(library.base_identity())
    for name in experts:
        live.copy_entry(library.get(name))
    return live


def active_rows(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=10).text
    return int(next((float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("expertkit_active_rows ")), 0.0))


def wait_admitted(url: str, rows: int, timeout_s: float = 300) -> bool:
    """Until the server reports `rows` requests decoding (all of the wave admitted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if active_rows(url) >= rows:
            return True
        time.sleep(0.02)
    return False


def live_reload(library, experts: list[str], requests: list[tuple[str, str]], start_server) -> dict:
    from serve import _load, peft_solo_texts

    rewritten, donor = experts[0], experts[1]
    wave = requests[:WAVE]  # at most one running batch: every request of it is admitted before the reload
    watched = [i for i, (m, _) in enumerate(wave) if m == rewritten]
    after = [(rewritten, p) for _, p in wave[:8]] + [(ADDED, p) for _, p in wave[8:16]]
    with tempfile.TemporaryDirectory(prefix="expertkit-live-") as tmp:
        live = copy_experts(library, experts, Path(tmp) / "library")
        old = peft_solo_texts(live, [wave[i] for i in watched])  # the weights current when the wave starts
        with start_server(live.root, [], ("--admin-key", ADMIN)) as (url, _):  # every entry, the added one too
            async def run_wave():
                started = asyncio.Event()
                task = asyncio.ensure_future(_load(url, wave, started))
                await started.wait()
                admitted = await asyncio.to_thread(wait_admitted, url, len(wave))
                live.copy_entry(live.get(donor), rewritten, overwrite=True)
                live.copy_entry(live.get(experts[2]), ADDED)
                running = await asyncio.to_thread(active_rows, url)
                reply = await asyncio.to_thread(httpx.post, url + "/v1/library/reload", timeout=300,
                                                headers={"Authorization": f"Bearer {ADMIN}"})
                return admitted, running, reply, await task

            admitted, running, reply, first = asyncio.run(run_wave())
            second = asyncio.run(_load(url, after))
        new = peft_solo_texts(live, after)
    stale = sum(first["texts"][i] != expected for i, expected in zip(watched, old))
    stale += sum(text != expected for text, expected in zip(second["texts"], new))
    return {"in_flight": len(wave), "all_admitted_before_reload": admitted, "running_at_reload": running,
            "rewritten": rewritten, "added": ADDED,
            "reload_status": reply.status_code, "reload_report": reply.json() if reply.status_code == 200 else None,
            "errors": first["errors"] + second["errors"] + (reply.status_code != 200),
            "checked": len(watched) + len(after), "stale_answers": stale}
