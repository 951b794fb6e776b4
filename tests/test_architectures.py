"""The core path on micro models of three architectures built from config (no download): Llama, Gemma3, Qwen2.

Train two experts, merge them, train a router, generate, and serve one request; run the mixture, the
proxy and a full-model merge; where a fast path exists beside the generic one (row-wise LoRA vs PEFT's
per-row adapters), both give the same logits.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import synthetic_documents, write_project

from expertkit.compose import build_compositions
from expertkit.library import Library
from expertkit.merging import make_recipe, merge_experts
from expertkit.runtime import BASE_ADAPTER, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad
from expertkit.serve.engine import Engine, Job
from expertkit.train import train_all
from expertkit.workflow import load_project_base, run_router_train

SIZE = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**SIZE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SIZE))


ARCHITECTURES = {"gemma3": _gemma3, "qwen2": _qwen2}


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2"])
def trained_arch(request, micro_base_dir, tmp_path_factory):
    """(config, base, library) of one architecture with experts alpha and beta, a linear merge, a lexical router."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        base_dir = micro_base_dir
    else:
        torch.manual_seed(0)
        base_dir = root / "base"
        ARCHITECTURES[request.param]().save_pretrained(base_dir)
        AutoTokenizer.from_pretrained(micro_base_dir).save_pretrained(base_dir)
    cfg, base = load_project_base(write_project(root, str(base_dir), base={"path": str(base_dir), "build": None}))
    assert base.model.config.model_type == ("llama" if request.param == "llama" else
                                            "gemma3_text" if request.param == "gemma3" else "qwen2")
    train_all(cfg, base)
    library = Library(cfg.library)
    merge_experts(ExpertPool(base, library), library, make_recipe(method="linear", experts=["alpha", "beta"]),
                  "merged")
    run_router_train(cfg, base, "lexical", "router")
    return request.param, cfg, base, library


def test_row_wise_lora_equals_peft_per_row_adapters(trained_arch):
    _, _, base, library = trained_arch
    pool = ExpertPool(base, library)
    ids, mask = left_pad(base.tokenizer, ["patient dose trial cohort", "def return self", "the a of"])
    adapters = ["alpha", "beta", BASE_ADAPTER]
    fast, _ = pool.prefill(ids, mask, adapters)
    row_lora, pool.host.row_lora = pool.host.row_lora, None  # the generic path: PEFT's adapter_names
    try:
        generic, _ = pool.prefill(ids, mask, adapters)
    finally:
        pool.host.row_lora = row_lora
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-5)
    for i, adapter in enumerate(adapters):  # and each row equals that adapter alone
        alone, _ = pool.prefill(ids[i:i + 1], mask[i:i + 1], [adapter])
        real = mask[i].bool()
        torch.testing.assert_close(fast[i][real], alone[0][real], rtol=1e-4, atol=1e-4)


def test_the_cache_goes_by_the_name_this_transformers_takes(trained_arch):
    """transformers 5.25 renamed `past_key_values` to `cache` and drops the old name in 5.40: prefill, extend
    and step use whichever name the model's forward declares (no deprecation warning), and read it back."""
    import warnings

    _, _, base, library = trained_arch
    pool = ExpertPool(base, library)
    ids, mask = left_pad(base.tokenizer, ["patient dose trial", "def return"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        _, state = pool.prefill(ids, mask, ["alpha", BASE_ADAPTER])
        _, state = pool.extend(state, ids[:, -2:], mask[:, -2:])
        logits, state = pool.step(state, ids[:, -1])
    assert logits.shape[0] == 2 and state.past.get_seq_length() == ids.shape[1] + 3


def test_every_composition_generates_and_the_router_routes(trained_arch):
    _, _, base, library = trained_arch
    pool = ExpertPool(base, library)
    compositions = {c.name: c for c in build_compositions(pool)}
    assert set(compositions) == {"base", "alpha", "beta", "merged", "router"}
    params = SamplingParams(max_new_tokens=6)
    for name, composition in compositions.items():
        texts = generate(composition, base.tokenizer, ["patient dose", "def return"], params)
        assert len(texts) == 2, name
    assert not torch.allclose(compositions["merged"].prefill(*left_pad(base.tokenizer, ["patient dose"]))[0],
                              compositions["base"].prefill(*left_pad(base.tokenizer, ["patient dose"]))[0])
    compositions["router"].prefill(*left_pad(base.tokenizer, [synthetic_documents("alpha", 1, seed=3)[0][:60],
                                                              synthetic_documents("beta", 1, seed=3)[0][:60]]))
    assert compositions["router"].last_routing.chosen == ["alpha", "beta"]


def test_the_server_engine_answers_as_generate_does(trained_arch):
    """Requests of different experts and lengths share the running batch (Gemma3's sliding-window layers too,
    past its window of 8 tokens) and each answers as generate() alone does."""
    _, _, base, library = trained_arch
    pool = ExpertPool(base, library)
    compositions = {c.name: c for c in build_compositions(pool)}
    requests = [("alpha", "patient dose trial"), ("beta", "def return self import for in if x"), ("base", "the")]
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(pool, compositions, max_batch=4).start()
    ends, finished = {}, threading.Semaphore(0)

    def emitter(i: int):
        def emit(event: dict) -> None:
            if event["type"] in ("end", "error"):
                ends[i] = event
                finished.release()
        return emit

    try:
        for i, (model, prompt) in enumerate(requests):
            engine.submit(Job(model, left_pad(base.tokenizer, [prompt])[0][0].tolist(), params, emitter(i)))
        for _ in requests:
            assert finished.acquire(timeout=60)
    finally:
        engine.stop()
    assert engine.stats.steps < len(requests) * params.max_new_tokens  # the rows did share decoding steps
    for i, (model, prompt) in enumerate(requests):
        assert ends[i]["type"] == "end", ends[i]
        assert ends[i]["full_text"] == generate(compositions[model], base.tokenizer, [prompt], params)[0]


def test_mixture_proxy_and_a_full_model_merge_on_every_architecture(trained_arch, tmp_path):
    """The compositions the core path above leaves out, on each architecture (Gemma3 past its sliding window):
    the mixture's and the proxy's cached steps equal recomputation, a model steered by its own expert through
    the proxy is that expert, and a linear merge written as a full model scores as its exact adapter form."""
    import shutil

    from conftest import assert_cached_steps_match

    from expertkit.base import load_base
    from expertkit.compose.adapters import AdapterComposition
    from expertkit.compose.collaborate import ProxyComposition
    from expertkit.compose.mix import MixtureComposition

    _, cfg, base, library = trained_arch
    pool = ExpertPool(base, library)
    ids = torch.randint(3, SIZE["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    real = mask.bool()

    mixture = MixtureComposition(pool, [AdapterComposition(pool, a, a) for a in ("alpha", "beta", BASE_ADAPTER)],
                                 2, "mix")
    assert_cached_steps_match(mixture, ids, mask, split=5)

    proxy = ProxyComposition(ExpertPool(load_base(cfg.base.path)), pool, "alpha")
    steered, _ = proxy.prefill(ids, mask)
    alpha, _ = pool.prefill(ids, mask, ["alpha"] * len(ids))
    torch.testing.assert_close(torch.log_softmax(steered, -1)[real], torch.log_softmax(alpha, -1)[real],
                               rtol=1e-4, atol=1e-4)
    assert_cached_steps_match(proxy, ids, mask, split=5)

    copy = Library(shutil.copytree(library.root, tmp_path / "library"))  # the module's library stays as it is
    for name, storage in (("exact", {"max_error": 1e-6}), ("full-model", {"output": "model"})):
        merge_experts(ExpertPool(base, copy), copy, make_recipe(method="linear", experts=["alpha", "beta"],
                                                                **storage), name)
    adapter_form, full_model = build_compositions(ExpertPool(base, copy), ["exact", "full-model"])
    assert copy.get("exact").kind == "merge" and copy.get("full-model").kind == "merged_model"
    torch.testing.assert_close(full_model.prefill(ids, mask)[0][real], adapter_form.prefill(ids, mask)[0][real],
                               rtol=1e-4, atol=1e-4)
