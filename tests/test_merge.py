"""Merging: exact ΔW-space merges, cross-checked against mergekit; clear errors for bad input."""

import json

import pytest
import torch

from expertkit.compose import ExpertPool, build_compositions
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.merging import make_recipe, merge_deltas, merge_experts
from expertkit.merging.deltas import expert_deltas
from expertkit.merging.export import factor
from expertkit.train import train_all
from expertkit.workflow import load_project_base

from conftest import write_project


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def two_expert_library(tmp_path, micro_base_dir, beta_training: dict):
    """One library: expert alpha with the default recipe, expert beta with `beta_training`."""
    library = str(tmp_path / "library")
    first = write_project(tmp_path / "a", str(micro_base_dir), domains=("alpha",), library=library)
    cfg, base = load_project_base(first)
    train_all(cfg, base)
    second = write_project(tmp_path / "b", str(micro_base_dir), domains=("beta",), library=library,
                           training=beta_training)
    cfg2, _ = load_project_base(second)
    train_all(cfg2, base)
    lib = Library(library)
    return cfg, base, lib, ExpertPool(base, lib)


@pytest.fixture
def mixed_library(tmp_path, micro_base_dir):
    """alpha: rank 4, alpha 8; beta: rank 2, alpha 7 with rsLoRA (different ranks, alphas, scalings)."""
    return two_expert_library(tmp_path, micro_base_dir, {"rank": 2, "alpha": 7, "use_rslora": True})


def test_deltas_honour_rank_alpha_and_rslora(mixed_library):
    from safetensors.torch import load_file

    cfg, base, lib, pool = mixed_library
    deltas = expert_deltas(pool, ["alpha", "beta"])
    module = "model.layers.0.self_attn.q_proj"
    w = load_file(str(lib.get("beta").path / "adapter_model.safetensors"))
    b = w[f"base_model.model.{module}.lora_B.weight"]
    a = w[f"base_model.model.{module}.lora_A.weight"]
    torch.testing.assert_close(deltas[module]["beta"], (7 / 2 ** 0.5) * b @ a)  # rsLoRA: alpha / sqrt(r)


def test_one_expert_at_weight_one_reproduces_it(mixed_library):
    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="linear", experts=["beta"])
    entry, report = merge_experts(pool, lib, recipe, "only-beta")
    assert report["rank"] == 2 and report["max_relative_error"] < 1e-5
    reloaded = ExpertPool(base, lib)
    original = expert_deltas(reloaded, ["beta"])
    merged = expert_deltas(reloaded, ["only-beta"])
    for module in original:
        assert rel_err(merged[module]["only-beta"], original[module]["beta"]) < 1e-5


def test_full_rank_linear_merge_of_different_ranks_is_lossless(mixed_library):
    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="linear", experts=["alpha", "beta"], weights=[0.3, 0.7])
    entry, report = merge_experts(pool, lib, recipe, "avg")
    assert report["rank"] == 6 and report["max_relative_error"] < 1e-5
    manifest = json.loads((entry.path / "expert.json").read_text())
    assert manifest["method"] == "linear" and manifest["parents"] == ["alpha", "beta"]
    reloaded = ExpertPool(base, lib)
    d = expert_deltas(reloaded, ["alpha", "beta", "avg"])
    for module, by in d.items():
        assert rel_err(by["avg"], 0.3 * by["alpha"] + 0.7 * by["beta"]) < 1e-5
    assert "avg" in [c.name for c in build_compositions(reloaded)]  # the scorecard sees it with no extra code


def test_truncated_rank_reports_its_error():
    delta = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    b, a, err = factor(delta, 12)
    assert err < 1e-6 and rel_err(b @ a, delta) < 1e-6
    _, _, err4 = factor(delta, 4)
    assert 0.1 < err4 < 1


def test_merge_is_linear_in_its_weights(mixed_library):
    cfg, base, lib, pool = mixed_library
    deltas = expert_deltas(pool, ["alpha", "beta"])

    def ta(w):
        return merge_deltas(deltas, make_recipe(method="task_arithmetic", experts=["alpha", "beta"], weights=w))

    one, two, mix = ta([1.0, 0.0]), ta([0.0, 1.0]), ta([0.4, 1.5])
    for m in one:
        torch.testing.assert_close(mix[m], 0.4 * one[m] + 1.5 * two[m], rtol=1e-5, atol=1e-7)
    avg = merge_deltas(deltas, make_recipe(method="linear", experts=["alpha", "beta"], weights=[2.0, 6.0]))
    for m in one:
        torch.testing.assert_close(avg[m], 0.25 * one[m] + 0.75 * two[m], rtol=1e-5, atol=1e-7)


def test_cross_check_against_mergekit():
    """Same ΔW inputs: expertkit (PEFT arithmetic) equals mergekit's merge_tensors."""
    from mergekit.merge_methods.api import merge_tensors

    g = torch.Generator().manual_seed(0)
    deltas = {"m": {"a": torch.randn(30, 20, generator=g), "b": torch.randn(30, 20, generator=g),
                    "c": torch.randn(30, 20, generator=g)}}
    tensors = [deltas["m"][k] for k in "abc"]
    zero = torch.zeros(30, 20)
    weights = [0.5, 1.0, 0.8]

    ours = merge_deltas(deltas, make_recipe(method="task_arithmetic", experts=list("abc"), weights=weights,
                                            **{"lambda": 0.7}))["m"]
    theirs = merge_tensors([zero, *tensors], "task_arithmetic", base_index=0,
                           parameters={"weight": weights, "lambda": 0.7})
    torch.testing.assert_close(ours, theirs)

    ours = merge_deltas(deltas, make_recipe(method="ties", experts=list("abc"), density=0.4))["m"]
    theirs = merge_tensors([zero, *tensors], "ties", base_index=0, parameters={"weight": 1.0, "density": 0.4})
    torch.testing.assert_close(ours, theirs)

    # DARE, fixed seed: mergekit keeps the same random entries; it rescales by norm, we by 1/density as the paper.
    ours = merge_deltas(deltas, make_recipe(method="dare_linear", experts=list("abc"), density=0.5, seed=3))["m"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * 100_003 + 0)
        theirs = merge_tensors([zero, *tensors], "dare_linear", base_index=0,
                               parameters={"weight": 1.0, "density": 0.5, "rescale": False})
    torch.testing.assert_close(ours, theirs / 0.5)


def test_full_model_merge_loads_with_transformers(mixed_library):
    from transformers import AutoModelForCausalLM

    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="ties", experts=["alpha", "beta"], density=0.5, output="model")
    entry, _ = merge_experts(pool, lib, recipe, "ties-model")
    assert entry.kind == "merged_model"
    merged = AutoModelForCausalLM.from_pretrained(entry.path)
    plain = AutoModelForCausalLM.from_pretrained(cfg.base.path)
    d = merge_deltas(expert_deltas(pool, ["alpha", "beta"]), recipe)
    module = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(merged.get_submodule(module).weight,
                               plain.get_submodule(module).weight + d[module])
    names = [c.name for c in build_compositions(ExpertPool(base, Library(lib.root)))]
    assert "ties-model" in names


def test_mismatched_target_modules(tmp_path, micro_base_dir):
    _, _, _, pool = two_expert_library(tmp_path, micro_base_dir, {"target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ExpertkitError, match="adapt different target modules"):
        expert_deltas(pool, ["alpha", "beta"])


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_dora_is_refused(mixed_library):
    cfg, base, lib, pool = mixed_library
    edit_json(lib.get("beta").path / "adapter_config.json", lambda config: config.update(use_dora=True))
    with pytest.raises(ExpertkitError, match="uses DoRA"):
        expert_deltas(pool, ["alpha", "beta"])


def test_expert_of_another_base_is_refused(mixed_library):
    cfg, base, lib, pool = mixed_library
    edit_json(lib.get("beta").path / "expert.json", lambda manifest: manifest["base"].update(weights_hash="0" * 16))
    with pytest.raises(ExpertkitError, match="expert 'beta' belongs to base"):
        ExpertPool(base, lib)


@pytest.mark.parametrize("fields, message", [
    ({"method": "slerpy", "experts": ["alpha"]}, "unknown merge method 'slerpy'; allowed:"),
    ({"method": "ties", "experts": ["alpha"], "density": 0.0}, "density must be in (0, 1], got 0.0"),
    ({"method": "ties", "experts": ["alpha"], "density": 1.5}, "density must be in (0, 1], got 1.5"),
    ({"method": "linear", "experts": []}, "experts"),
    ({"method": "linear", "experts": ["alpha", "beta"], "weights": [1.0]}, "1 weights for 2 experts"),
])
def test_bad_recipes_are_one_clear_error(fields, message):
    with pytest.raises(ExpertkitError) as err:
        make_recipe(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_merge_errors_write_nothing(monkeypatch, capsys, trained, project):
    from test_cli import assert_one_line_error, run_cli

    cfg, _, lib = trained
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--method", "ties", "--density", "0")
    assert_one_line_error(code, err, "density must be in (0, 1]")
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--method", "nope")
    assert_one_line_error(code, err, "unknown merge method 'nope'")
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--expert", "gamma")
    assert_one_line_error(code, err, "'gamma' is not a library adapter")
    assert not (lib.root / "merges").exists()
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--method", "dare_ties", "--density", "0.5",
                           "--name", "dt")
    assert code == 0, err
    assert (lib.root / "merges" / "dt" / "adapter_model.safetensors").is_file()


def test_search_picks_a_recipe_within_budget(trained):
    from expertkit.workflow import run_merge_search

    cfg, base, lib = trained
    result = run_merge_search(cfg, base, None, "searched", budget_seconds=3)
    assert result["trials"] >= 1 and result["recipe"]["method"]
    assert lib.get("searched").manifest["search"]["trials"] == result["trials"]
    assert set(result["validation_ppl"]) == {"general", "alpha", "beta"}


def test_a_rewritten_entry_is_reloaded_not_served_stale(mixed_library):
    cfg, base, lib, pool = mixed_library
    merge_experts(pool, lib, make_recipe(method="linear", experts=["alpha"]), "m")
    first = expert_deltas(ExpertPool(base, lib), ["m"])
    merge_experts(pool, lib, make_recipe(method="linear", experts=["beta"]), "m", overwrite=True)
    second = expert_deltas(ExpertPool(base, lib), ["m", "beta"])
    module = next(iter(second))
    assert rel_err(second[module]["m"], second[module]["beta"]) < 1e-5
    assert rel_err(second[module]["m"], first[module]["m"]) > 0.1
