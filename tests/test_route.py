"""Routers: training, calibration, persistence, the routed composition, and bad inputs."""

import shutil
from pathlib import Path

import pytest
import torch

from expertkit.compose import build_compositions
from expertkit.compose.route import route_to_entries
from expertkit.errors import ExpertkitError
from expertkit.evaluate import score
from expertkit.evaluate import test_blocks as domain_test_blocks
from expertkit.library import Library
from expertkit.routing import Prompts, evaluate, load_router, router_kinds, save_router, train_router
from expertkit.routing.calibrate import calibrate_threshold, decide
from expertkit.routing.train import domain_texts, label_domains, routing_units, with_prefixes
from expertkit.runtime import ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad

from conftest import assert_cached_steps_match, synthetic_documents, write_project

ROUTING = {"train_documents": 80, "model_documents": 40, "calibration_documents": 12, "batch_size": 24}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, micro_base_dir):
    """(cfg, base, pool) with experts trained long enough to be told apart (shared by the whole module)."""
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    root = tmp_path_factory.mktemp("route")
    cfg, base = load_project_base(write_project(root, str(micro_base_dir), training={"steps": 30}, routing=ROUTING))
    train_all(cfg, base)
    return cfg, base, ExpertPool(base, Library(cfg.library))


@pytest.fixture(scope="module")
def lexical(setup):
    cfg, base, pool = setup
    calibrated, report = train_router(cfg, pool, "lexical", "router-lexical")
    save_router(Library(cfg.library), calibrated, report, overwrite=True)
    return calibrated


def test_a_running_text_is_learned_line_by_line_and_a_document_whole():
    """Prompts are the size of a line: a piece of a stream file is learned as its lines, a document whole."""
    from expertkit.data import Example

    piece = Example(text="Fears for pension after talks\nUnions say they are disappointed.\n\n", continues=True)
    assert routing_units(piece) == ["Fears for pension after talks", "Unions say they are disappointed."]
    assert routing_units(Example(text="one document\nof two lines")) == ["one document\nof two lines"]


def test_routers_learn_each_document_and_its_prefix_once(micro_base_dir):
    """A document no longer than the prefix is its own prefix: listed twice, it would weigh double."""
    from transformers import AutoTokenizer

    from expertkit.config import RoutingConfig

    tokenizer = AutoTokenizer.from_pretrained(micro_base_dir)
    short, long = "short line", "a longer document that runs past the prefix " * 3
    texts = with_prefixes(tokenizer, {"x": [short, long]}, RoutingConfig(calibration_prefix_tokens=16))["x"]
    prefix = tokenizer.decode(tokenizer(long, add_special_tokens=False)["input_ids"][:16])
    assert texts == [short, long, prefix] and prefix != long


def test_labels_are_the_experts_plus_base(setup):
    cfg, _, pool = setup
    assert label_domains(cfg, pool) == {"alpha": "alpha", "beta": "beta", "base": "general"}


@pytest.mark.parametrize("kind", router_kinds())
def test_each_router_kind_routes_the_synthetic_domains(setup, kind):
    cfg, _, pool = setup
    calibrated, report = train_router(cfg, pool, kind, f"router-{kind}", abstain_rate=0.0)
    texts = domain_texts(cfg, label_domains(cfg, pool), "test", 12)
    experts_only = {k: v for k, v in texts.items() if k != "base"}
    assert evaluate(calibrated, pool, experts_only)["accuracy"] >= 0.9
    # Arrow learns no "base" label (it is reached by abstaining), and the likelihood router sends general
    # text to whichever model predicts it best: experts trained with general replay beat this micro base.
    if kind in ("lexical", "embedding"):
        assert evaluate(calibrated, pool, {"base": texts["base"]})["accuracy"] >= 0.9
    assert report["fit_seconds"] < 30


def test_abstain_threshold_hits_the_target_rate_on_validation(setup):
    cfg, _, pool = setup
    for rate in (0.0, 0.25, 0.5):
        calibrated, report = train_router(cfg, pool, "embedding", "router-embedding", abstain_rate=rate)
        n_expert_prompts = 2 * 2 * len(domain_texts(cfg, {"alpha": "alpha"}, "valid", 12)["alpha"])
        assert abs(report["validation"]["abstain_rate"] - rate) <= 1 / n_expert_prompts
    assert calibrate_threshold(torch.tensor([0.9, 0.5, 0.7, 0.6]), 0.5) == pytest.approx(0.65)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.45, 0.4, 0.15]])
    assert decide(probs, threshold=0.5).tolist() == [0, 2, 2]


def test_router_saved_and_reloaded_gives_identical_choices(setup, lexical):
    cfg, base, pool = setup
    reloaded = load_router(Library(cfg.library), Library(cfg.library).get("router-lexical"))
    assert reloaded.threshold == lexical.threshold and reloaded.router.labels == lexical.router.labels
    texts = synthetic_documents("alpha", 5, seed=9) + synthetic_documents("beta", 5, seed=9) + ["the a of and"]
    prompts = Prompts.from_texts(base.tokenizer, texts)
    before, after = lexical.route(pool, prompts), reloaded.route(pool, prompts)
    assert before.chosen == after.chosen
    torch.testing.assert_close(before.probabilities, after.probabilities)
    assert before.chosen[:5] == ["alpha"] * 5 and before.chosen[5:10] == ["beta"] * 5


def test_every_kind_survives_save_and_reload(setup, tmp_path):
    cfg, base, pool = setup
    library = Library(cfg.library)
    prompts = Prompts.from_texts(base.tokenizer, synthetic_documents("beta", 3, seed=4) + ["patient dose trial"])
    for kind in ("embedding", "likelihood", "arrow"):
        calibrated, report = train_router(cfg, pool, kind, f"saved-{kind}")
        entry = save_router(library, calibrated, report, overwrite=True)
        reloaded = load_router(library, entry)
        torch.testing.assert_close(calibrated.route(pool, prompts).probabilities,
                                   reloaded.route(pool, prompts).probabilities)


def test_routed_mixed_batch_equals_one_at_a_time(setup, lexical):
    _, base, pool = setup
    routed = route_to_entries(pool, lexical, "routed")
    prompts = ["patient dose trial cohort tumor clinical therapy risk blood", "def return self import for in if",
               "the a of and to in is was for on that with as by at from it his an were are"]
    ids, mask = left_pad(base.tokenizer, prompts)
    batched, _ = routed.prefill(ids, mask)
    assert routed.last_routing.chosen == ["alpha", "beta", "base"]
    for i, prompt in enumerate(prompts):
        one_ids, one_mask = left_pad(base.tokenizer, [prompt])
        alone, _ = routed.prefill(one_ids, one_mask)
        n = int(one_mask.sum())
        torch.testing.assert_close(batched[i, -n:], alone[0, -n:], rtol=1e-4, atol=1e-4)


def test_routed_composition_is_used_unchanged_by_scorecard_and_generator(setup, lexical):
    cfg, base, pool = setup
    pool.ensure(["router-lexical"])  # saved after the pool was made
    routed = build_compositions(pool, ["router-lexical"])[0]
    blocks = domain_test_blocks(cfg, base.tokenizer)
    card = score([routed, *build_compositions(pool, ["alpha", "beta"])], blocks, 8)
    assert card["ppl"]["router-lexical"]["alpha"] == pytest.approx(card["ppl"]["alpha"]["alpha"], rel=1e-4)
    assert card["ppl"]["router-lexical"]["beta"] == pytest.approx(card["ppl"]["beta"]["beta"], rel=1e-4)
    ids = blocks["beta"].input_ids[:2, :20]
    assert_cached_steps_match(routed, ids, torch.ones_like(ids), split=12)
    greedy = SamplingParams(max_new_tokens=6)
    assert generate(routed, base.tokenizer, ["patient dose"], greedy) == \
        generate(build_compositions(pool, ["alpha"])[0], base.tokenizer, ["patient dose"], greedy)


def test_bad_prompts_are_clear_errors_or_documented_fallbacks(setup, lexical):
    cfg, base, pool = setup
    with pytest.raises(ExpertkitError, match="prompt 1 is empty"):
        Prompts.from_texts(base.tokenizer, ["patient", "  "])
    routed = route_to_entries(pool, lexical, "routed")
    ids, mask = left_pad(base.tokenizer, ["patient dose", "the"])
    mask[1] = 0
    with pytest.raises(ExpertkitError, match="row 1 of the batch is empty"):
        routed.prefill(ids, mask)
    long_ids = torch.randint(3, 200, (1, 80))
    with pytest.raises(ExpertkitError, match="exceeds the model's context of 64"):
        routed.prefill(long_ids, torch.ones_like(long_ids))
    # Routers themselves read only the last tokens of an over-long prompt (the documented fallback).
    calibrated, _ = train_router(cfg, pool, "embedding", "router-embedding")
    long_alpha = " ".join(synthetic_documents("alpha", 12, seed=5))
    assert len(base.tokenizer(long_alpha)["input_ids"]) > 64
    assert calibrated.route(pool, Prompts.from_texts(base.tokenizer, [long_alpha])).chosen == ["alpha"]


def test_router_naming_a_missing_expert_is_one_clear_error(setup, lexical, tmp_path):
    cfg, base, _ = setup
    copy = tmp_path / "library"
    shutil.copytree(cfg.library, copy)
    shutil.rmtree(copy / "experts" / "beta")
    library = Library(copy)
    with pytest.raises(ExpertkitError, match=r"router 'router-lexical' routes to \['beta'\].*retrain it"):
        load_router(library, library.get("router-lexical"))
    with pytest.raises(ExpertkitError, match=r"routes to \['beta'\]"):
        build_compositions(ExpertPool(base, library, names=["alpha", "router-lexical"]))


def test_cli_router_train_and_route(monkeypatch, capsys, setup):
    from test_cli import run_cli

    cfg, _, _ = setup
    project = Path(cfg.library).parent / "project.yaml"
    code, _, err = run_cli(monkeypatch, capsys, "router", "train", project, "--kind", "lexical", "--name", "cli-router",
                           "--abstain-rate", "0.1", "--force")
    assert code == 0 and "router 'cli-router' (lexical)" in err, err
    code, out, err = run_cli(monkeypatch, capsys, "route", project, "def return self import", "--router", "cli-router")
    assert code == 0 and out.startswith("choice: beta") and "alpha" in out and "base" in out, out + err
    code, _, err = run_cli(monkeypatch, capsys, "route", project, "   ", "--router", "cli-router")
    assert code == 1 and "prompt 0 is empty" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "route", project, "patient")
    assert code == 1 and "pass --router NAME" in err


def test_routed_scores_are_leak_free(setup, lexical):
    """With context tokens, a router decides from them alone; the rest is scored step by step, exactly."""
    from expertkit.evaluate import nll_sum

    cfg, base, pool = setup
    pool.ensure(["router-lexical"])
    routed, alpha = build_compositions(pool, ["router-lexical", "alpha"])
    read: list[int] = []
    choose = routed.router.route
    routed.router.route = lambda pool, prompts: (read.extend(len(r) for r in prompts.ids), choose(pool, prompts))[1]
    blocks = domain_test_blocks(cfg, base.tokenizer)
    score([routed], blocks, 8, context_tokens=8)
    assert read and set(read) == {8}  # never more than the context: not the tokens it is scored on
    score([routed], blocks, 8)
    assert max(read) == blocks["alpha"].input_ids.shape[1]  # without context tokens it reads whole blocks
    batch = blocks["alpha"].take(slice(0, 4))
    one_prefill = nll_sum(alpha, batch, context_tokens=8)
    alpha.decides_from_prompt = True  # the same expert through the stepped path scores the same tokens
    stepped = nll_sum(alpha, batch, context_tokens=8)
    assert stepped[1] == one_prefill[1] == 4 * (batch.input_ids.shape[1] - 8)
    assert stepped[0] == pytest.approx(one_prefill[0], rel=1e-5)


def test_a_choice_that_is_not_an_adapter_runs_as_itself_on_its_rows(setup, lexical):
    """A router's choice may be any composition: a full merged model answers its rows by itself."""
    from expertkit.compose.nesting import SplitState, entry_composition
    from expertkit.compose.route import RoutedComposition
    from expertkit.merging import make_recipe, merge_experts

    cfg, base, pool = setup
    library = Library(cfg.library)
    if not library.has("merged_model", "alpha-full"):
        merge_experts(pool, library, make_recipe(method="linear", experts=["alpha"], output="model"), "alpha-full")
    pool.ensure(["alpha-full"])
    adapters = route_to_entries(pool, lexical, "routed")
    full = entry_composition(pool, "alpha-full")
    nested = RoutedComposition(pool, lexical, "nested", {**adapters.choices, "alpha": full})
    prompts = ["patient dose trial cohort tumor clinical therapy risk blood", "def return self import for in if",
               "the a of and to in is was for on that with as by at from it his an were are"]
    ids, mask = left_pad(base.tokenizer, prompts)
    expected, _ = adapters.prefill(ids, mask)
    got, state = nested.prefill(ids, mask)
    assert isinstance(state, SplitState) and len(state.groups) == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (_, nested_state), (_, adapter_state) = nested.prefill(ids[:, :-1], mask[:, :-1]), adapters.prefill(ids[:, :-1],
                                                                                                          mask[:, :-1])
    torch.testing.assert_close(nested.step(nested_state, ids[:, -1])[0], adapters.step(adapter_state, ids[:, -1])[0],
                               rtol=1e-4, atol=1e-4)
