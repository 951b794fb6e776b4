"""The token-level mixture: exact posterior-weighted ensembles, causal posteriors, cached steps, entries."""

import math
from pathlib import Path

import pytest
import torch

from expertkit.compose import build_compositions
from expertkit.compose.adapters import AdapterComposition
from expertkit.compose.mix import MixtureComposition, add_mixture
from expertkit.config import MixtureConfig
from expertkit.errors import ExpertkitError
from expertkit.evaluate import score
from expertkit.evaluate import test_blocks as domain_test_blocks
from expertkit.library import Library
from expertkit.runtime import BASE_ADAPTER, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad

from conftest import assert_cached_steps_match, write_project

COMPONENTS = ["alpha", "beta", BASE_ADAPTER]


def adapter_mixture(pool, adapters: list[str], top_k: int | None, name: str = "m") -> MixtureComposition:
    """A mixture of adapters of the pool (the mixture's fast path)."""
    return MixtureComposition(pool, [AdapterComposition(pool, a, a) for a in adapters], top_k, name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_base_dir):
    """(cfg, base, library) with experts alpha and beta, shared by the whole module."""
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    cfg, base = load_project_base(write_project(tmp_path_factory.mktemp("mix"), str(micro_base_dir)))
    train_all(cfg, base)
    return cfg, base, Library(cfg.library)


@pytest.fixture(scope="module")
def pool(trained):
    _, base, library = trained
    return ExpertPool(base, library)


def ids_and_mask(seed: int, rows: int = 3, width: int = 14):
    ids = torch.randint(3, 200, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    return ids, mask


def reference_mixture(pool, ids, mask, components, top_k):
    """The mixture computed the slow way: each component alone, posterior from tokens <= t by hand (on the CPU,
    whatever device the pool runs on)."""
    log_probs = torch.stack([torch.log_softmax(pool.prefill(ids, mask, [c] * len(ids))[0].cpu(), -1)
                             for c in components], 1)
    seen = torch.zeros(log_probs.shape[:3])
    for t in range(1, ids.shape[1]):
        real = (mask[:, t] * mask[:, t - 1]).float()
        predicted = log_probs[:, :, t - 1].gather(-1, ids[:, None, t, None].expand(-1, len(components), 1))[..., 0]
        seen[:, :, t] = predicted * real[:, None]
    evidence = seen.cumsum(-1) - math.log(len(components))
    kept = evidence.topk(top_k, dim=1).indices
    keep = torch.zeros_like(evidence, dtype=torch.bool).scatter(1, kept, True)
    log_post = torch.log_softmax(evidence.masked_fill(~keep, float("-inf")), dim=1)
    return (log_post.unsqueeze(-1) + log_probs).logsumexp(1)


def test_one_component_at_posterior_one_is_that_expert(pool):
    ids, mask = ids_and_mask(0)
    mixed, _ = adapter_mixture(pool, ["alpha"], None).prefill(ids, mask)
    alpha, _ = pool.prefill(ids, mask, ["alpha"] * len(ids))
    real = mask.bool()
    torch.testing.assert_close(mixed[real], torch.log_softmax(alpha, -1)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixture_equals_the_posterior_weighted_ensemble(pool, top_k):
    ids, mask = ids_and_mask(1)
    mixed, _ = adapter_mixture(pool, COMPONENTS, top_k).prefill(ids, mask)
    mixed, expected = mixed.cpu(), reference_mixture(pool, ids, mask, COMPONENTS, top_k)
    real = mask.bool()
    torch.testing.assert_close(mixed[real], expected[real], rtol=1e-4, atol=1e-4)
    assert torch.allclose(mixed.exp().sum(-1)[real], torch.ones(int(real.sum())), atol=1e-4)


def test_logits_at_t_do_not_depend_on_later_tokens(pool):
    ids, mask = ids_and_mask(2)
    changed = ids.clone()
    changed[:, 9:] = torch.randint(3, 200, changed[:, 9:].shape, generator=torch.Generator().manual_seed(5))
    mixture = adapter_mixture(pool, COMPONENTS, 2)
    a, _ = mixture.prefill(ids, mask)
    b, _ = mixture.prefill(changed, mask)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=1e-5, atol=1e-5)


def test_cached_steps_equal_recomputation(pool):
    ids, mask = ids_and_mask(3)
    mixture = adapter_mixture(pool, COMPONENTS, 2)
    assert_cached_steps_match(mixture, ids, mask, split=8)


def test_mixture_entry_is_a_composition_for_scorecard_and_generator(trained, pool):
    cfg, base, library = trained
    add_mixture(library, "mix", MixtureConfig(top_k=2))
    pool.ensure(["mix"])
    mix, alpha, beta = build_compositions(pool, ["mix", "alpha", "beta"])
    card = score([mix, alpha, beta], domain_test_blocks(cfg, base.tokenizer), 8)
    for domain, own in (("alpha", "alpha"), ("beta", "beta")):  # the posterior finds the right expert quickly
        assert card["ppl"]["mix"][domain] < 1.1 * card["ppl"][own][domain]
    text = generate(mix, base.tokenizer, ["patient dose", "def return"], SamplingParams(max_new_tokens=5))
    assert len(text) == 2 and all(isinstance(t, str) for t in text)


def test_bad_mixtures_and_inputs_are_clear_errors(trained, pool):
    _, base, library = trained
    with pytest.raises(ExpertkitError, match=r"mixture 'm' names \['gamma'\].*does not hold"):
        add_mixture(library, "m", MixtureConfig(experts=["alpha", "gamma"]))
    with pytest.raises(ExpertkitError, match="has no components"):
        MixtureComposition(pool, [], None, "empty")
    ids, mask = left_pad(base.tokenizer, ["patient", "dose"])
    mask[0] = 0
    with pytest.raises(ExpertkitError, match="row 0 of the batch is empty"):
        adapter_mixture(pool, COMPONENTS, None).prefill(ids, mask)
    long_ids = torch.randint(3, 200, (1, 70))
    with pytest.raises(ExpertkitError, match="exceeds the model's context of 64"):
        adapter_mixture(pool, COMPONENTS, None).prefill(long_ids, torch.ones_like(long_ids))


def test_cli_mixture_add(monkeypatch, capsys, trained):
    from test_cli import run_cli

    project = Path(trained[0].library).parent / "project.yaml"
    code, _, err = run_cli(monkeypatch, capsys, "mixture", "add", project, "--name", "mix2", "--top-k", "1",
                           "--no-base")
    assert code == 0 and "mixture 'mix2' of ['alpha', 'beta']" in err, err
    entry = Library(trained[0].library).get("mix2")
    assert entry.kind == "mixture" and entry.manifest["top_k"] == 1 and not entry.manifest["include_base"]
    code, _, err = run_cli(monkeypatch, capsys, "mixture", "add", project, "--name", "mix3", "--expert", "nope")
    assert code == 1 and "names ['nope']" in err


def served_mixture(library) -> str:
    """The mixture 'mix-served' (top 2), made by whichever test needs it first."""
    if not library.has("mixture", "mix-served"):
        add_mixture(library, "mix-served", MixtureConfig(top_k=2))
    return "mix-served"


def test_a_served_mixture_answers_like_generate(trained, pool):
    """The server batches a mixture's rows as the mixture, never as plain rows of the pool."""
    import httpx

    from expertkit.serve.app import create_app
    from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

    _, base, library = trained
    served_mixture(library)
    pool.ensure(["mix-served"])
    (mix,) = build_compositions(pool, ["mix-served"])
    prompts = ["patient dose", "def return x"]
    expected = generate(mix, base.tokenizer, prompts, SamplingParams(max_new_tokens=6))
    service = build_local_service(library.root, ServeOptions(max_batch=8, models=["mix-served", "alpha"]))
    with BackgroundServer(create_app(service)) as server:
        reply = httpx.post(server.url + "/v1/completions", json={
            "model": "mix-served", "prompt": prompts, "max_tokens": 6, "temperature": 0}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])] == expected


def test_a_component_that_is_not_an_adapter_runs_as_itself(trained, pool):
    """A mixture of a full merged model and an adapter equals the mixture of the adapters it stands for."""
    from expertkit.compose.nesting import StackedState, entry_composition
    from expertkit.merging import make_recipe, merge_experts

    _, _, library = trained
    if not library.has("merged_model", "alpha-full"):
        merge_experts(pool, library, make_recipe(method="linear", experts=["alpha"], output="model"), "alpha-full")
    pool.ensure(["alpha-full"])
    nested = MixtureComposition(pool, [entry_composition(pool, "alpha-full"), AdapterComposition(pool, "beta", "beta")],
                                None, "nested")
    ids, mask = ids_and_mask(5)
    got, state = nested.prefill(ids, mask)
    torch.testing.assert_close(got, adapter_mixture(pool, ["alpha", "beta"], None).prefill(ids, mask)[0], rtol=1e-4,
                               atol=1e-4)
    assert isinstance(state.components, StackedState)
    assert_cached_steps_match(nested, ids, mask, split=9)
    with pytest.raises(ExpertkitError, match="not other mixtures"):
        add_mixture(library, "mix-of-mix", MixtureConfig(experts=["alpha", served_mixture(library)]))
