"""Merging: exact ΔW-space merges, cross-checked against mergekit; clear errors for bad input."""

import json

import pytest
import torch

from expertkit.compose import build_compositions
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.merging import make_recipe, merge_deltas, merge_experts
from expertkit.merging.deltas import expert_deltas
from expertkit.merging.export import factor
from expertkit.runtime import ExpertPool
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
    recipe = make_recipe(method="linear", experts=["beta"], max_error=1e-5)
    entry, report = merge_experts(pool, lib, recipe, "only-beta")
    assert report["rank"] == 2 and report["max_relative_error"] < 1e-5
    reloaded = ExpertPool(base, lib)
    original = expert_deltas(reloaded, ["beta"])
    merged = expert_deltas(reloaded, ["only-beta"])
    for module in original:
        assert rel_err(merged[module]["only-beta"], original[module]["beta"]) < 1e-5


def test_full_rank_linear_merge_of_different_ranks_is_lossless(mixed_library):
    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="linear", experts=["alpha", "beta"], weights=[0.3, 0.7], max_error=1e-5)
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


def random_deltas(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"m": {f"e{i}": torch.randn(30, 20, generator=g) for i in range(n)}}


def mergekit_merge(method: str, deltas: dict, **parameters) -> torch.Tensor:
    """mergekit's own merge of the same ΔW tensors (a zero base, so its task vectors are the ΔWs)."""
    from mergekit.merge_methods.api import merge_tensors

    tensors = list(deltas["m"].values())
    if method == "linear":  # mergekit's linear takes no base
        return merge_tensors(tensors, "linear", parameters=parameters)
    return merge_tensors([torch.zeros_like(tensors[0]), *tensors], method, base_index=0, parameters=parameters)


UNEQUAL = [0.7, 0.3, 1.6]


@pytest.mark.parametrize("ours, theirs_method, theirs", [
    ({"method": "ties", "density": 0.4}, "ties", {"density": 0.4}),  # normalize: mergekit's default (true)
    ({"method": "ties", "density": 0.4, "normalize": False, "lambda": 0.8}, "ties",
     {"density": 0.4, "normalize": False, "lambda": 0.8}),
    ({"method": "breadcrumbs", "density": 0.8, "gamma": 0.05, "lambda": 0.7}, "breadcrumbs",
     {"density": 0.8, "gamma": 0.05, "lambda": 0.7}),
    ({"method": "breadcrumbs", "density": 0.8, "gamma": 0.05, "normalize": True}, "breadcrumbs",
     {"density": 0.8, "gamma": 0.05, "normalize": True}),
    ({"method": "magnitude_prune", "density": 0.5}, "breadcrumbs", {"density": 0.5, "gamma": 0.0}),
    ({"method": "task_arithmetic", "lambda": 0.7}, "task_arithmetic", {"lambda": 0.7}),
    ({"method": "linear"}, "linear", {}),
])
def test_weighted_merges_equal_mergekit(ours, theirs_method, theirs):
    """Unequal weights: expertkit's merge of the ΔWs is mergekit's, weights and normalize included."""
    deltas = random_deltas(3)
    mine = merge_deltas(deltas, make_recipe(experts=list(deltas["m"]), weights=UNEQUAL, **ours))["m"]
    reference = mergekit_merge(theirs_method, deltas, weight=UNEQUAL, **theirs)
    assert rel_err(mine, reference) < 1e-6


def test_ties_normalizes_by_the_agreeing_weights():
    """mergekit's TIES divides by the sum of agreeing weights: scaling all weights changes nothing."""
    deltas = random_deltas(3)

    def ties(weights, **fields):
        return merge_deltas(deltas, make_recipe(method="ties", experts=list(deltas["m"]), weights=weights,
                                                density=0.5, **fields))["m"]

    torch.testing.assert_close(ties([2.0, 2.0, 2.0]), ties([1.0, 1.0, 1.0]))
    torch.testing.assert_close(ties([2.0, 2.0, 2.0], normalize=False), 2 * ties([1.0, 1.0, 1.0], normalize=False))


def test_ties_frequency_sign_is_mergekits_count_consensus():
    """majority_sign=frequency: mergekit's TIES pieces (magnitude trim, count consensus), normalized by weights."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import magnitude

    deltas = random_deltas(3)
    weights = torch.tensor(UNEQUAL)[:, None, None]
    kept = torch.stack([magnitude(d, 0.4) for d in deltas["m"].values()]) * weights
    mask = get_mask(kept, method="count")
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    mine = merge_deltas(deltas, make_recipe(method="ties", experts=list(deltas["m"]), weights=UNEQUAL, density=0.4,
                                            majority_sign="frequency"))["m"]
    assert rel_err(mine, (kept * mask).sum(dim=0) / divisor) < 1e-6


@pytest.fixture
def fixed_masks(monkeypatch):
    """DARE's random source (torch.bernoulli, in mergekit and in PEFT alike) hands out fixed masks in call order.

    Returns `rewind`: after it, the next calls get the same masks again, so two implementations see one drop.
    """
    g = torch.Generator().manual_seed(1)
    masks, state = [], {"next": 0}

    def bernoulli(p, *args, **kwargs):
        if state["next"] == len(masks):
            masks.append((torch.rand(p.shape, generator=g) < p).to(p.dtype))
        state["next"] += 1
        return masks[state["next"] - 1]

    monkeypatch.setattr(torch, "bernoulli", bernoulli)

    def rewind() -> int:
        used, state["next"] = state["next"], 0
        return used

    return rewind


@pytest.mark.parametrize("method, fields", [
    ("dare_linear", {"lambda": 0.6}),
    ("dare_ties", {}),
    ("dare_ties", {"normalize": True, "lambda": 1.3}),
])
def test_dare_equals_mergekit_given_the_same_drop_mask(fixed_masks, method, fields):
    """Same masks: mergekit (rescale off) / density is ours (DARE rescales kept entries by 1/density)."""
    deltas = random_deltas(3)
    density = 0.5
    mine = merge_deltas(deltas, make_recipe(method=method, experts=list(deltas["m"]), weights=UNEQUAL,
                                            density=density, **fields))["m"]
    assert fixed_masks() == 3  # one mask per expert was drawn
    theirs = mergekit_merge(method, deltas, weight=UNEQUAL, density=density, rescale=False, **fields) / density
    assert fixed_masks() == 3
    assert rel_err(mine, theirs) < 1e-6


@pytest.mark.parametrize("output", ["adapter", "model"])
def test_a_non_finite_merge_is_refused_before_anything_is_written(mixed_library, output):
    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="task_arithmetic", experts=["alpha", "beta"], output=output, **{"lambda": 1e300})
    with pytest.raises(ExpertkitError, match="non-finite") as err:
        merge_experts(pool, lib, recipe, "overflow")
    assert "\n" not in str(err.value)
    assert not lib.has_name("overflow") and not (lib.root / "merges").exists()


def test_sparsified_merge_is_stored_within_its_error_bound(mixed_library):
    """A TIES ΔW is full rank: the adapter gets the smallest rank within max_error, and says so."""
    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="ties", experts=["alpha", "beta"], weights=[0.7, 0.3], density=0.5)
    entry, report = merge_experts(pool, lib, recipe, "ties")
    exact = merge_deltas(expert_deltas(pool, ["alpha", "beta"]), recipe)
    stored = expert_deltas(ExpertPool(base, lib), ["ties"])
    worst = max(rel_err(stored[m]["ties"], exact[m]) for m in exact)
    assert worst <= 0.01
    record = entry.manifest["reconstruction"]
    assert record["stored_as"] == "adapter" and record["bound"] == 0.01 and record["chosen_by"] == "max_error"
    assert record["max_relative_error"] == pytest.approx(worst, abs=1e-6)
    assert max(factor(d, record["rank"] - 1)[2] for d in exact.values()) > 0.01  # the smallest such rank


def test_no_rank_within_the_bound_stores_the_full_model(mixed_library):
    cfg, base, lib, pool = mixed_library
    recipe = make_recipe(method="ties", experts=["alpha", "beta"], density=0.5, max_error=1e-12)
    entry, report = merge_experts(pool, lib, recipe, "ties-exact")
    record = entry.manifest["reconstruction"]
    assert entry.kind == "merged_model" and record["stored_as"] == "model" and record["bound"] == 1e-12
    assert record["chosen_by"] == "no rank up to full is within max_error"
    assert record["max_relative_error"] < 1e-4  # float32 rounding of base + ΔW only


def test_searched_sparsifying_merge_is_stored_within_its_bound(trained, monkeypatch):
    """`merge --search` stores what it ranked (the exact merge) within the bound, not a lossy re-factoring."""
    from expertkit.merging import search as search_module
    from expertkit.merging.methods import METHODS
    from expertkit.workflow import run_merge_search

    monkeypatch.setattr(search_module, "METHODS", {"ties": METHODS["ties"]})  # the grid's first trial: TIES
    cfg, base, lib = trained
    result = run_merge_search(cfg, base, None, "searched", budget_seconds=0)
    assert result["recipe"]["method"] == "ties"
    pool = ExpertPool(base, Library(lib.root))
    recipe = make_recipe(**result["recipe"])
    exact = merge_deltas(expert_deltas(pool, recipe.experts), recipe)
    stored = expert_deltas(pool, ["searched"])
    worst = max(rel_err(stored[m]["searched"], exact[m]) for m in exact)
    assert worst <= 0.01
    record = lib.get("searched").manifest["reconstruction"]
    assert record["stored_as"] == "adapter" and record["bound"] == 0.01
    assert record["max_relative_error"] == pytest.approx(worst, abs=1e-6)


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
    ({"method": "linear", "experts": ["a", "b"], "weights": [1.0, -1.0]}, "weights [1.0, -1.0] sum to 0"),
    ({"method": "ties", "experts": ["a", "b"], "weights": [0.5, -0.5]}, "sum to 0"),
    ({"method": "linear", "experts": ["a"], "density": 0.5},
     "'linear' does not take density (its parameters: lambda, normalize)"),
    ({"method": "task_arithmetic", "experts": ["a"], "gamma": 0.1}, "'task_arithmetic' does not take gamma"),
    ({"method": "ties", "experts": ["a"], "seed": 3}, "'ties' does not take seed"),
    ({"method": "ties", "experts": ["a"], "rank": 4, "max_error": 0.05}, "rank or max_error"),
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
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--method", "linear", "--density", "0.5")
    assert_one_line_error(code, err, "'linear' does not take density")
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--weight", "1", "--weight", "-1",
                           "--output", "model")
    assert_one_line_error(code, err, "weights [1.0, -1.0] sum to 0")
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--search", "--density", "0.5")
    assert_one_line_error(code, err, "--search chooses")
    # a project that lists only alpha, over the library that also holds beta
    alpha_only = write_project(project.parent / "alpha-only", str(cfg.base.path), domains=("alpha",),
                               library=str(lib.root))
    code, _, err = run_cli(monkeypatch, capsys, "merge", alpha_only, "--search")
    assert_one_line_error(code, err, "lists no domain for expert(s) {'beta': 'beta'}")
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
    base_ppl = result["base_validation_ppl"]
    assert set(base_ppl) == set(result["validation_ppl"])
    assert result["worse_than_base_on"] == [d for d, p in result["validation_ppl"].items() if p > base_ppl[d]]


def test_search_prefers_a_recipe_that_keeps_every_domain_to_a_better_mean(monkeypatch):
    """A merge worse than the base on one domain ranks after one that is not, even with a lower mean."""
    from expertkit.executors import Context
    from expertkit.merging import search as search_module
    from expertkit.merging.methods import METHODS

    base = {"general": 10.0, "alpha": 20.0}
    lopsided = {"general": 10.5, "alpha": 8.0}  # the lower mean, but worse than the base on general
    even = {"general": 9.9, "alpha": 15.0}
    monkeypatch.setattr(search_module, "METHODS", {m: METHODS[m] for m in ("linear", "task_arithmetic")})
    monkeypatch.setattr(search_module, "score_base", lambda _, state, advance: base)
    monkeypatch.setattr(search_module, "run_trial",
                        lambda recipe, state, advance: lopsided if recipe.method == "linear" else even)
    result = search_module.search(["alpha"], Context(lambda: None), budget_seconds=0.2)
    assert result.base_ppl == base
    assert {t.regressions for t in result.trials} == {("general",), ()}
    assert result.best.ppl == even and result.best.regressions == ()


def test_a_rewritten_entry_is_reloaded_not_served_stale(mixed_library):
    cfg, base, lib, pool = mixed_library
    merge_experts(pool, lib, make_recipe(method="linear", experts=["alpha"]), "m")
    first = expert_deltas(ExpertPool(base, lib), ["m"])
    merge_experts(pool, lib, make_recipe(method="linear", experts=["beta"]), "m", overwrite=True)
    second = expert_deltas(ExpertPool(base, lib), ["m", "beta"])
    module = next(iter(second))
    assert rel_err(second[module]["m"], second[module]["beta"]) < 1e-5
    assert rel_err(second[module]["m"], first[module]["m"]) > 0.1


def test_a_copied_library_with_other_weights_is_not_read_as_the_original(mixed_library, tmp_path):
    """Two libraries on one base may hold an expert of the same name and manifest (a library copied, then its
    adapter edited): each pool reads its own library's weights, not the ones the other loaded first."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg, base, lib, pool = mixed_library
    copy = Library(shutil.copytree(lib.root, tmp_path / "copy"))
    weights = copy.get("alpha").path / "adapter_model.safetensors"
    save_file({k: 2 * v if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    original = expert_deltas(ExpertPool(base, lib), ["alpha"])
    doubled = expert_deltas(ExpertPool(base, copy), ["alpha"])
    for module in original:
        torch.testing.assert_close(doubled[module]["alpha"], 2 * original[module]["alpha"])
