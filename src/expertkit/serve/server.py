"""Putting a server together: library -> base + pool + compositions -> engine -> app -> uvicorn."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from expertkit.config import ServeOptions
from expertkit.errors import ExpertkitError
from expertkit.library import BASE, MANIFEST, Kind

log = logging.getLogger("expertkit.serve")


def pick_router(entries, requested: str | None) -> str | None:
    """The router `auto` uses: the one asked for, else the library's best on its own validation prompts."""
    routers = [e for e in entries if e.kind == Kind.ROUTER]
    if requested is not None:
        if requested not in [e.name for e in routers]:
            raise ExpertkitError(f"router '{requested}' is not in the library; routers there: "
                                 f"{[e.name for e in routers] or 'none'}")
        return requested
    if not routers:
        return None
    best = max(routers, key=lambda e: (*router_rank(e.manifest)[:2], e.name))
    if len(routers) > 1:
        _, accuracy, what = router_rank(best.manifest)
        log.warning("model 'auto' uses router '%s' (%s %.1f%%, the best of %d); choose another with --router",
                    best.name, what, 100 * accuracy, len(routers))
    return best.name


def router_rank(manifest: dict) -> tuple[bool, float, str]:
    """How `auto` ranks a router: first those validated on held-out prompts, by the worst of their accuracy on
    each label's prompts and on validation documents (everyday requests must reach the base as surely as
    domain requests their expert); then the others, by validation accuracy on documents."""
    documents = manifest.get("validation", {}).get("accuracy") or 0.0
    by_label = manifest.get("prompt_validation", {}).get("by_label")
    if by_label:
        return True, min(documents, *by_label.values()), "worst of held-out prompt and document accuracy"
    return False, documents, "validation accuracy"


@contextmanager
def engine_threads():
    """Yields torch's thread count, run with one intra-op thread meanwhile; the engine thread takes the count.

    With OpenMP, torch runs 1.2-1.4x slower in a thread other than the first one that ran multi-threaded
    ops (2 cores: a 64-row decode step of SmolLM2-135M took 197 ms in the engine thread after the model was
    loaded with 2 threads in the main thread, 131 ms in the main thread itself). So the main thread loads
    the model with one thread, and the engine thread is the first to run with all of them.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def build_local_service(library_path: Path, options: ServeOptions):
    """Load the base once, attach the library's adapters to it, and start the engine."""
    with engine_threads() as threads:
        return _build_local_service(library_path, options, threads)


def _build_local_service(library_path: Path, options: ServeOptions, threads: int):
    from expertkit.base import load_base
    from expertkit.compose import build_compositions
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool
    from expertkit.serve.engine import Engine
    from expertkit.serve.service import Limits, LocalService

    if options.token_map and not options.small:
        raise ExpertkitError("--token-map aligns a small model's vocabulary with the served one; add --small SMALL")
    library = Library(library_path)
    identity = library.base_identity()
    base_path = options.base or identity["name"]
    if not Path(base_path).exists() and options.base is None:
        raise ExpertkitError(f"the library's base '{base_path}' is not on this machine; pass --base PATH")
    base = load_base(base_path, options.device)
    names = [m for m in options.models if m != "base"] if options.models else None  # [] = the base alone
    pool = ExpertPool(base, library, names=names)
    small = None
    if options.small:
        from expertkit.compose.collaborate import load_small_pool

        small = load_small_pool(options.small, options.device)
    compositions = {c.name: c for c in build_compositions(pool, small=small, token_map=options.token_map)}
    router = pick_router(pool.entries, options.router)
    context = pool.context_length
    limits = Limits(max_prompt_tokens=options.max_prompt_tokens or context or 2048,
                    max_tokens=min(options.max_tokens, context or options.max_tokens))
    engine = Engine(pool, compositions, max_batch=options.max_batch, max_queue=options.max_queue,
                    threads=threads).start()
    return LocalService(engine, limits, context, router, LibraryReloader(engine, options, small), options.watch_s)


class LibraryReloader:
    """Serve what the library holds now, without a restart (POST /v1/library/reload, or --watch-s).

    New entries become servable, rewritten ones serve their new weights to new requests, removed ones
    stop being served; requests in flight finish on the weights they started on. It runs in the engine
    thread between decoding steps, so nothing else touches the model meanwhile.
    """

    def __init__(self, engine, options: ServeOptions, small):
        self.engine, self.options, self.small = engine, options, small
        self.only = set(options.models) - {BASE} if options.models else None
        self.signature = library_signature(engine.pool.library.root)

    def reload(self) -> dict:
        """In the engine thread: sync the pool with the library, rebuild the compositions (and the mixes in use
        whose experts are still served), re-pick the router."""
        from expertkit.compose import build_compositions
        from expertkit.compose.adapters import is_mix, mix_composition, single_adapters
        from expertkit.compose.collaborate import collaboration_names

        pool = self.engine.pool
        self.signature = library_signature(pool.library.root)
        report = pool.sync(self.engine.live_adapters(), self.only)
        offered = collaboration_names(self.small.adapter_names) if self.small is not None else []
        compositions = {}
        for name in [BASE, *(e.name for e in pool.entries), *offered]:
            try:
                (compositions[name],) = build_compositions(pool, [name], small=self.small,
                                                           token_map=self.options.token_map)
            except ExpertkitError as e:
                report["refused"][name] = str(e)
        for name in [n for n in self.engine.compositions if is_mix(n)]:
            try:
                compositions[name] = mix_composition(pool, name, single_adapters(compositions))
            except ExpertkitError:
                continue  # one of its experts is gone: asked for again, it is a 400 naming it
        self.engine.compositions = compositions
        try:
            report["router"] = pick_router(pool.entries, self.options.router)
        except ExpertkitError as e:
            report["router"], report["refused"][self.options.router] = None, str(e)
        return report

    def changed(self) -> bool:
        return library_signature(self.engine.pool.library.root) != self.signature


def library_signature(root: Path) -> tuple:
    """What changes when an entry is written, rewritten or removed: every manifest's path and mtime."""
    found = []
    for path in Path(root).glob("*/*/" + MANIFEST):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # an entry still being written (atomic_dir's temporary folder)
        try:
            found.append((str(path.relative_to(root)), path.stat().st_mtime_ns))
        except FileNotFoundError:  # removed while we looked
            continue
    return tuple(sorted(found))


class BackgroundServer:
    """uvicorn in a thread on 127.0.0.1 (tests and benchmarks); `with` starts it and stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ExpertkitError("the server did not start (is the port free?)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
