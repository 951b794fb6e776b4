"""Routing what users type: chat prompts read by their user message, routers that learn the base's territory
from prompt files, the router `auto` picks, the abstain rate in /metrics, and prompts no router expects."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from conftest import write_project

from expertkit.encoding import encode_texts
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.routing import Prompts, train_router
from expertkit.runtime import ExpertPool

ROUTING = {"train_documents": 80, "model_documents": 40, "calibration_documents": 12, "batch_size": 24}
CHATML = ("{% if messages[0].role != 'system' %}<|endoftext|>system\nYou are a helpful assistant.<|pad|>\n{% endif %}"
          "{% for m in messages %}<|endoftext|>{{ m.role }}\n{{ m.content }}<|pad|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def everyday_prompts(n: int, seed: int = 0) -> list[str]:
    """Requests no expert of the synthetic domains was trained for."""
    rng = random.Random(seed)
    verbs = ["Write", "Compose", "Draft", "Suggest", "Give me", "Tell me", "Plan", "Describe"]
    things = ["a haiku", "a short poem", "a birthday message", "three ideas", "a recipe", "a story", "a joke",
              "a travel plan", "a thank-you note", "a riddle"]
    topics = ["autumn", "my cat", "the sea", "a rainy day", "friendship", "mountains", "breakfast", "summer",
              "a long walk", "the city at night", "my grandmother", "a garden"]
    return [f"{rng.choice(verbs)} {rng.choice(things)} about {rng.choice(topics)}." for _ in range(n)]


def fresh_tokenizer(micro_base_dir, template: str | None = CHATML):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_base_dir)
    tokenizer.chat_template = template
    return tokenizer


def test_a_chat_prompt_is_routed_by_its_last_user_message(micro_base_dir):
    tokenizer = fresh_tokenizer(micro_base_dir)
    messages = [{"role": "user", "content": "def return self"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "patient dose trial"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raw = "You are a helpful assistant. patient dose"
    prompts = Prompts.from_ids(tokenizer, [tokenizer(chat, add_special_tokens=False)["input_ids"],
                                           encode_texts(tokenizer, [raw])[0]])
    assert prompts.texts == ["patient dose trial", raw]
    assert prompts.ids[0] == encode_texts(tokenizer, ["patient dose trial"])[0]
    # without a template every prompt is read as it is
    plain = fresh_tokenizer(micro_base_dir, template=None)
    ids = plain(chat, add_special_tokens=False)["input_ids"]
    assert Prompts.from_ids(plain, [ids]).ids == [ids]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, micro_base_dir):
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    root = tmp_path_factory.mktemp("prompts")
    (root / "everyday.txt").write_text("\n".join(everyday_prompts(120)) + "\n")
    project = write_project(root, str(micro_base_dir), training={"steps": 30},
                            routing={**ROUTING, "prompts": {"base": "everyday.txt"}})
    cfg, base = load_project_base(project)
    train_all(cfg, base)
    return cfg, base, ExpertPool(base, Library(cfg.library))


def test_prompt_files_teach_the_router_the_bases_territory(setup):
    cfg, _, pool = setup
    assert cfg.routing.prompts["base"].endswith("everyday.txt")  # resolved against the YAML's folder
    calibrated, report = train_router(cfg, pool, "lexical", "router-lexical")
    held = report["prompt_validation"]
    assert held["n"] > 0 and held["by_label"]["base"] >= 0.9
    unseen = everyday_prompts(40, seed=7)
    routing = calibrated.route(pool, Prompts.from_texts(pool.tokenizer, unseen))
    assert routing.chosen.count("base") >= 36
    # trained on documents alone, the same router sends most of them to an expert
    blind, report = train_router(cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"prompts": {}})}),
                                 pool, "lexical", "router-lexical")
    assert "prompt_validation" not in report
    assert blind.route(pool, Prompts.from_texts(pool.tokenizer, unseen)).chosen.count("base") < 30


@pytest.mark.parametrize("content, fragment", [
    (None, "not found"),
    ('{"text": "fine"}\nnot json\n', "invalid JSON"),
    ('{"prompt": "wrong field"}\n', "'text'"),
    ("one\ntwo\n", "too few"),
])
def test_bad_prompt_files_are_one_clear_error(setup, tmp_path, content, fragment):
    cfg, _, pool = setup
    path = tmp_path / ("prompts.jsonl" if content and content.startswith("{") else "prompts.txt")
    if content is not None:
        path.write_text(content)
    routing = cfg.routing.model_copy(update={"prompts": {"base": str(path)}})
    with pytest.raises(ExpertkitError, match=fragment):
        train_router(cfg.model_copy(update={"routing": routing}), pool, "lexical", "r")


def test_a_prompt_file_for_an_unknown_label_is_refused(setup, tmp_path):
    cfg, _, pool = setup
    routing = cfg.routing.model_copy(update={"prompts": {"gamma": str(tmp_path / "x.txt")}})
    with pytest.raises(ExpertkitError, match="gamma"):
        train_router(cfg.model_copy(update={"routing": routing}), pool, "lexical", "r")


def test_auto_prefers_the_router_validated_on_prompts():
    from types import SimpleNamespace

    from expertkit.serve.server import pick_router

    def router(name, accuracy, by_label=None):
        manifest = {"validation": {"accuracy": accuracy}}
        if by_label:
            manifest["prompt_validation"] = {"by_label": by_label}
        return SimpleNamespace(kind="router", name=name, manifest=manifest)

    documents_only = router("docs", 0.99)
    on_prompts = router("prompts", 0.95, {"base": 0.97, "alpha": 0.93})
    weaker = router("weaker", 0.98, {"base": 0.99, "alpha": 0.60})
    poor_on_documents = router("poor", 0.80, {"base": 0.99})
    assert pick_router([documents_only, on_prompts, weaker, poor_on_documents], None) == "prompts"
    assert pick_router([documents_only], None) == "docs"


@pytest.fixture(scope="module")
def server(setup):
    from expertkit.routing import save_router
    from expertkit.serve.app import create_app
    from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

    cfg, _, pool = setup
    calibrated, report = train_router(cfg, pool, "lexical", "router-lexical")
    save_router(Library(cfg.library), calibrated, report, overwrite=True)
    service = build_local_service(cfg.library, ServeOptions(max_batch=8, max_tokens=8))
    with BackgroundServer(create_app(service)) as srv:
        yield srv


def test_metrics_report_the_abstain_rate_of_routed_requests(server):
    for prompt in ["patient dose trial", "def return self", *everyday_prompts(2)]:
        reply = httpx.post(server.url + "/v1/completions",
                           json={"model": "auto", "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200, reply.text
    text = httpx.get(server.url + "/metrics").text
    routed = [line for line in text.splitlines() if line.startswith("expertkit_routed_requests ")]
    assert routed and float(routed[0].split()[1]) >= 4
    assert any(line.startswith("expertkit_abstain_rate ") for line in text.splitlines())


@pytest.mark.parametrize("prompt", ["", "   \n\t ", "😀🎉🙃", "x " * 50_000])
def test_prompts_no_router_expects_get_a_decision_or_a_clear_4xx(server, prompt):
    for body in ({"model": "auto", "prompt": prompt, "max_tokens": 2},
                 {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        reply = httpx.post(server.url + path, content=json.dumps(body),
                           headers={"Content-Type": "application/json"}, timeout=60)
        assert reply.status_code in (200, 400), reply.text
        if reply.status_code == 400:
            assert reply.json()["error"]["message"]
        else:
            assert reply.headers["x-expertkit-expert"] in ("alpha", "beta", "base")


def test_a_fitted_prior_sends_prompts_to_the_label_the_scores_alone_miss():
    import torch

    from expertkit.routing.base import fit_prior

    # label 1's prompts score a little higher under label 0 (an expert that predicts them slightly better);
    # label 0's own prompts score much higher there; label 2 has no prompts. Label 1 brought 3x the prompts,
    # which must not buy it a larger prior: labels are balanced.
    scores = torch.tensor([[0.1, 0.0, 0.0]] * 15 + [[0.5, 0.0, 0.0]] * 5)
    targets = torch.tensor([1] * 15 + [0] * 5)
    prior = fit_prior(scores, targets, temperature=0.05)
    assert prior[2] == 0
    assert torch.equal((scores / 0.05 + prior).argmax(-1), targets)
