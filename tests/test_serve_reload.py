"""A live library: entries written, rewritten or removed while the server runs are served (or not) without a
restart; requests in flight finish on the weights they started on; a bad reload changes nothing."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest

from expertkit.compose import build_compositions
from expertkit.library import Library
from expertkit.runtime import ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad
from expertkit.serve.app import create_app
from expertkit.serve.engine import Job
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

ADMIN = "admin-key"
PROMPT = "patient dose"


@pytest.fixture
def library(sentence_library, tmp_path):
    """A copy of the shared library that this test may rewrite."""
    return Library(shutil.copytree(sentence_library.root, tmp_path / "library"))


def reference(library: Library, name: str, params: SamplingParams) -> str:
    """What generate() answers for `name` on a fresh pool of the library as it is on disk now."""
    from expertkit.base import load_base

    pool = ExpertPool(load_base(library.base_identity()["name"]), library)
    (composition,) = build_compositions(pool, [name])
    return generate(composition, pool.tokenizer, [PROMPT], params)[0]


def ask(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12,
                                                     "temperature": 0}, timeout=60)


def reload(url: str, key: str | None = ADMIN) -> httpx.Response:
    return httpx.post(url + "/v1/library/reload", headers={"Authorization": f"Bearer {key}"} if key else {},
                      timeout=60)


@pytest.mark.filterwarnings("error:Adapter .* was active which is now deleted")  # a served log stays clean
def test_rewritten_added_and_removed_entries_without_a_restart(library):
    params = SamplingParams(max_new_tokens=12)
    old_alpha, beta = reference(library, "alpha", params), reference(library, "beta", params)
    assert old_alpha != beta
    service = build_local_service(library.root, ServeOptions(max_batch=8))
    long = SamplingParams(max_new_tokens=40)
    long_old = reference(library, "alpha", long)
    started, ended, events = threading.Event(), threading.Event(), []

    def emit(event: dict) -> None:
        events.append(event)
        started.set()
        if event["type"] in ("end", "error"):
            ended.set()

    with BackgroundServer(create_app(service, admin_key=ADMIN)) as server:
        service.engine.submit(Job("alpha", left_pad(service.tokenizer, [PROMPT])[0][0].tolist(), long, emit,
                                  ignore_eos=True))
        assert started.wait(30)
        gate, in_flight = threading.Event(), []

        def reload_mid_request() -> dict:  # runs in the engine thread: the request cannot move meanwhile
            in_flight.append(not ended.is_set())
            assert gate.wait(30)
            return service.reloader.reload()

        pending = service.engine.call(reload_mid_request)
        # alpha rewritten (beta's weights) while its request runs, and a new expert
        library.copy_entry(library.get("beta"), "alpha", overwrite=True)
        library.copy_entry(library.get("beta"), "gamma")
        gate.set()
        report = pending.result(timeout=60)
        assert in_flight == [True]
        assert report["updated"] == ["alpha"] and report["added"] == ["gamma"]
        assert ended.wait(60) and events[-1]["type"] == "end"
        assert events[-1]["full_text"] == long_old  # the request in flight finished on the old weights
        assert ask(server.url, "alpha").json()["choices"][0]["text"] == beta  # new requests: the new weights
        assert ask(server.url, "gamma").json()["choices"][0]["text"] == beta
        assert "gamma" in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        host = service.engine.pool.host
        assert sorted(host.entry_of) == sorted(name for name, _ in host.current.values())  # old alpha dropped

        shutil.rmtree(library.get("gamma").path)
        removed = reload(server.url)  # over HTTP, with the admin key
        assert removed.status_code == 200 and removed.json()["removed"] == ["gamma"], removed.text
        assert ask(server.url, "gamma").status_code == 404
        assert "gamma" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]


def test_bad_reloads_change_nothing(library):
    service = build_local_service(library.root, ServeOptions(max_batch=8))
    with BackgroundServer(create_app(service)) as server:  # no admin key: reloading over HTTP is off
        assert reload(server.url).status_code == 403
    with BackgroundServer(create_app(service, admin_key=ADMIN)) as server:
        assert reload(server.url, "wrong").status_code == 401
        assert reload(server.url, None).status_code == 401
        before = ask(server.url, "beta").json()["choices"][0]["text"]
        (library.get("beta").path / "expert.json").write_text("{ not json", encoding="utf-8")
        refused = reload(server.url)
        assert refused.status_code == 409 and "corrupted" in refused.json()["error"]["message"]
        assert ask(server.url, "beta").json()["choices"][0]["text"] == before  # still served, unchanged
        assert httpx.get(server.url + "/health").status_code == 200


def test_watching_the_library_serves_a_new_expert(library):
    service = build_local_service(library.root, ServeOptions(max_batch=8, watch_s=0.2))
    with BackgroundServer(create_app(service)) as server:
        assert ask(server.url, "delta").status_code == 404
        library.copy_entry(library.get("alpha"), "delta")
        for _ in range(100):
            if "delta" in service.model_names():
                break
            threading.Event().wait(0.1)
        assert ask(server.url, "delta").status_code == 200


def test_a_base_whose_adapters_were_all_rewritten_still_runs(library):
    """Every adapter replaced while the bare base was PEFT's active choice (a Ray worker reusing its base)."""
    from expertkit.base import load_base
    from expertkit.runtime import BASE_ADAPTER

    base = load_base(library.base_identity()["name"])
    ids, mask = left_pad(base.tokenizer, [PROMPT])
    first = ExpertPool(base, library)
    first.prefill(ids, mask, [BASE_ADAPTER])
    for name in ("alpha", "beta"):
        library.copy_entry(library.get("beta"), name, overwrite=True)
    second = ExpertPool(base, library)
    beta, _ = second.prefill(ids, mask, ["beta"])
    for name in ("alpha", "beta", BASE_ADAPTER):
        logits, _ = second.prefill(ids, mask, [name])
        assert logits.isfinite().all()
    assert (second.prefill(ids, mask, ["alpha"])[0] == beta).all()
