"""Federated experts: exact aggregation, a dead client, a resumed server, the privacy accountant, compression,
Flower's simulation against the in-process run, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from conftest import assert_one_line_error, project_dict, run_cli, synthetic_documents

SILOS = 4


def federated_project(root, base_path, silo_docs=None, federated=None, steps=16):
    """The 'alpha' domain cut into SILOS silos by document (its text lives only there), 'beta' central."""
    raw = project_dict(root, base_path)
    docs = synthetic_documents("alpha", 160)
    silos = []
    for i in range(SILOS):
        path = root / "data" / f"silo{i}.txt"
        text = docs[i::SILOS] if silo_docs is None else silo_docs[i]
        path.write_text("\n".join(text) + ("\n" if text else ""), encoding="utf-8")
        silos.append({"name": f"s{i}", "source": {"path": str(path), "documents": "line"}})
    raw["domains"][0] = {"name": "alpha", "silos": silos}
    raw["training"]["steps"] = steps
    raw["federated"] = {"local_steps": 2, **(federated or {})}
    path = root / "project.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def load(project):
    from expertkit.workflow import load_project_base

    return load_project_base(project)


def trainer_and_transport(project, tmp_path):
    from expertkit.federated.local import LocalTransport
    from expertkit.federated.server import FederatedTrainer

    cfg, base = load(project)
    return FederatedTrainer(cfg, base, "alpha"), LocalTransport(cfg, "alpha", tmp_path / "clients")


def adapter_weights(entry):
    from safetensors.torch import load_file

    return load_file(entry.path / "adapter_model.safetensors")


@pytest.mark.parametrize("aggregation", ["alternating", "frozen_a"])
def test_aggregated_delta_w_is_the_weighted_mean_of_the_clients(tmp_path, micro_base_dir, aggregation):
    from expertkit.federated import aggregate
    from expertkit.federated.client import RoundTask
    from expertkit.federated.compress import decode

    trainer, transport = trainer_and_transport(
        federated_project(tmp_path, str(micro_base_dir), federated={"aggregation": aggregation}), tmp_path)
    weights = {s: d["examples"] for s, d in transport.describe(trainer.base.identity(),
                                                                trainer.config.training).items()}
    assert len(set(weights.values())) > 1  # unequal silos: a weighted mean, not a plain one
    scale = trainer.config.training.alpha / trainer.config.training.rank
    state = trainer._initial_state()
    for r in range(2):  # alternating: B in round 1, A in round 2
        factor = trainer.schedule(r)
        task = RoundTask(r, 4, factor, state, trainer.config.training, trainer.config.federated)
        answers = transport.train(task)
        shapes = {k: state[k].shape for k in state if f".{factor}." in k}
        # each client's own adapter after the round: everything it sent (a client that changed both factors
        # would show it here), against the server's mean of the round's factor
        clients = {s: aggregate.add(state, decode(a.payload, {k: state[k].shape for k in a.payload}))
                   for s, a in answers.items()}
        new_state = aggregate.add(state, aggregate.weighted_mean([decode(a.payload, shapes) for a in answers.values()],
                                                                 [weights[s] for s in answers]))
        client_dw = {s: aggregate.delta_weights(c, scale) for s, c in clients.items()}
        global_dw = aggregate.delta_weights(new_state, scale)
        total = sum(weights.values())
        for module, dw in global_dw.items():
            expected = sum(weights[s] * client_dw[s][module] for s in clients) / total
            assert (dw - expected).abs().max() < 1e-6
            assert (client_dw["s0"][module] - client_dw["s1"][module]).abs().max() > 1e-6  # clients differ
        state = new_state
    assert [trainer.schedule(r) for r in range(2)] == (["lora_B", "lora_A"] if aggregation == "alternating"
                                                       else ["lora_B", "lora_B"])


def test_averaging_both_factors_separately_is_not_exact():
    """Why the factors alternate: the mean of B_k A_k is not mean(B) mean(A) (the check above can fail)."""
    from expertkit.federated import aggregate

    g = torch.Generator().manual_seed(0)
    clients = [{"m.lora_A.weight": torch.randn(2, 6, generator=g), "m.lora_B.weight": torch.randn(6, 2, generator=g)}
               for _ in range(2)]
    separate = aggregate.delta_weights(aggregate.weighted_mean(clients, [1, 1]), 1.0)["m"]
    exact = sum(aggregate.delta_weights(c, 1.0)["m"] for c in clients) / 2
    assert (separate - exact).abs().max() > 1e-2


def test_flower_simulation_trains_the_same_expert_as_the_in_process_run(tmp_path, micro_base_dir):
    """Flower's Simulation Runtime (virtual SuperNodes on Ray) and the local transport: the same adapter."""
    from expertkit.federated import train_federated

    entries = {}
    for engine in ("flower", "local"):
        cfg, base = load(federated_project(tmp_path / engine, str(micro_base_dir), steps=16,
                                           federated={"compression": {"top_k": 0.2}}))
        entries[engine] = train_federated(cfg, base, "alpha", engine=engine)
    flower, local = (adapter_weights(e) for e in entries.values())
    assert flower.keys() == local.keys()
    for k in flower:
        torch.testing.assert_close(flower[k], local[k], rtol=0, atol=1e-6)
    manifest = entries["flower"].manifest["federated"]
    assert manifest["silos"] == ["s0", "s1", "s2", "s3"] and manifest["rounds"] == 2
    assert any(v.abs().max() > 0 for k, v in flower.items() if "lora_B" in k)  # it learned something


def test_a_client_that_dies_mid_round_is_dropped_and_the_round_goes_on(tmp_path, micro_base_dir, monkeypatch):
    from expertkit.errors import ExpertkitError
    from expertkit.federated.client import SiloClient
    from expertkit.library import Library

    original = SiloClient.train

    def dies_in_round_2(self, task):
        if self.silo == "s2" and task.round_index == 1:
            raise RuntimeError("node lost")
        return original(self, task)

    monkeypatch.setattr(SiloClient, "train", dies_in_round_2)
    trainer, transport = trainer_and_transport(federated_project(tmp_path, str(micro_base_dir)), tmp_path)
    entry = trainer.run(transport)
    log = entry.manifest["rounds_log"]
    assert log[1]["failed"] == ["s2"] and log[1]["clients"] == ["s0", "s1", "s3"]
    assert entry.manifest["federated"]["dropped_client_rounds"] == 1 and len(log) == 2

    # with every silo required, the round fails with one clear message; the rounds before it are kept
    strict = federated_project(tmp_path / "strict", str(micro_base_dir), federated={"min_clients": 4}, steps=24)
    trainer, transport = trainer_and_transport(strict, tmp_path / "strict")
    with pytest.raises(ExpertkitError, match="only 3 of 4 silos answered"):
        trainer.run(transport)
    assert not Library(trainer.config.library).has("expert", "alpha")
    assert [p.name for p in sorted(trainer.folder.glob("round-*.pt"))] == ["round-00001.pt"]


def test_a_killed_server_resumes_and_ends_with_the_same_adapter(tmp_path, micro_base_dir, monkeypatch):
    """Killed after round 2 of 4 (with compression: the clients' residuals must survive too)."""
    from expertkit.federated.client import SiloClient
    from expertkit.federated.server import FederatedTrainer

    federated = {"compression": {"top_k": 0.1}}
    trainer, transport = trainer_and_transport(
        federated_project(tmp_path / "whole", str(micro_base_dir), federated=federated, steps=32), tmp_path / "w")
    uninterrupted = adapter_weights(trainer.run(transport))

    save = FederatedTrainer._save

    def killed_after_round_2(self, rounds_done, state, log):
        save(self, rounds_done, state, log)
        if rounds_done == 2:
            raise KeyboardInterrupt

    project = federated_project(tmp_path / "killed", str(micro_base_dir), federated=federated, steps=32)
    monkeypatch.setattr(FederatedTrainer, "_save", killed_after_round_2)
    trainer, transport = trainer_and_transport(project, tmp_path / "k")
    with pytest.raises(KeyboardInterrupt):
        trainer.run(transport)
    monkeypatch.setattr(FederatedTrainer, "_save", save)
    trainer, transport = trainer_and_transport(project, tmp_path / "k")  # a new server process: from disk
    trained_rounds = []
    train = SiloClient.train

    def recorded(self, task):
        trained_rounds.append(task.round_index)
        return train(self, task)

    monkeypatch.setattr(SiloClient, "train", recorded)
    resumed = trainer.run(transport)
    assert sorted(set(trained_rounds)) == [2, 3]  # rounds 1-2 came from the checkpoint, not trained again
    assert len(resumed.manifest["rounds_log"]) == 4
    for k, v in adapter_weights(resumed).items():
        torch.testing.assert_close(v, uninterrupted[k], rtol=0, atol=0)


def test_the_accountant_matches_opacus_and_the_gaussian_mechanism_formula():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from expertkit.config import PrivacyConfig
    from expertkit.federated.privacy import PrivacyLedger

    ledger = PrivacyLedger(PrivacyConfig(noise_multiplier=2.0, delta=1e-5), planned_rounds=10)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    # every silo in every round: 10 Gaussian mechanisms, RDP(α) = 10 α / (2 σ²), no subsampling
    rdp = compute_rdp(q=1.0, noise_multiplier=2.0, steps=10, orders=orders)
    assert all(math.isclose(r, 10 * a / 8) for r, a in zip(rdp, orders))
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert math.isclose(ledger.epsilon_after(10), eps, rel_tol=1e-9)
    assert 7.5 < ledger.epsilon_after(10) < 8.5  # σ = 2 over 10 rounds is about ε = 8 at δ = 1e-5
    calibrated = PrivacyLedger(PrivacyConfig(epsilon=8.0), planned_rounds=10)
    assert calibrated.epsilon_after(10) <= 8.0 < calibrated.epsilon_after(11)


def test_a_base_with_library_adapters_attached_is_refused_before_any_round(tmp_path, micro_base_dir):
    """A pool's adapters on the shared base would collide with the server's own PEFT wrapping (a KeyError)."""
    from expertkit.errors import ExpertkitError
    from expertkit.federated import train_federated
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool

    cfg, base = load(federated_project(tmp_path, str(micro_base_dir), steps=16))
    entry = train_federated(cfg, base, "alpha", engine="local")
    ExpertPool(base, Library(cfg.library))
    with pytest.raises(ExpertkitError, match="already has library adapters attached"):
        train_federated(cfg, base, "alpha", engine="local", overwrite=True)
    kept, trained = adapter_weights(Library(cfg.library).get("alpha")), adapter_weights(entry)
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)  # nothing rewritten


def test_a_target_epsilon_stops_training_and_the_manifest_records_privacy(tmp_path, micro_base_dir):
    from expertkit.config import PrivacyConfig
    from expertkit.federated.privacy import PrivacyLedger

    sigma = 1.5
    probe = PrivacyLedger(PrivacyConfig(noise_multiplier=sigma), planned_rounds=4)
    target = (probe.epsilon_after(2) + probe.epsilon_after(3)) / 2  # room for 2 rounds, not 3
    privacy = {"epsilon": target, "noise_multiplier": sigma, "clip": 0.01}
    trainer, transport = trainer_and_transport(
        federated_project(tmp_path, str(micro_base_dir), federated={"privacy": privacy}, steps=32), tmp_path)
    entry = trainer.run(transport)
    recorded = entry.manifest["federated"]
    assert recorded["rounds"] == 2 and recorded["planned_rounds"] == 4 and "target epsilon" in recorded["stopped"]
    assert recorded["privacy"]["epsilon"] == pytest.approx(probe.epsilon_after(2))
    assert recorded["privacy"]["epsilon"] <= target
    assert {"delta", "clip", "noise_multiplier"} <= recorded["privacy"].keys()
    assert recorded["silos"] == ["s0", "s1", "s2", "s3"]


@pytest.mark.parametrize("top_k, bits, ratio", [(0.05, 8, 10), (0.1, 8, 10), (1.0, 3, 10), (0.5, 4, 3),
                                               (1.0, 16, 1.9), (0.2, 32, 2)])
def test_compression_sends_fewer_bytes_and_loses_nothing_for_good(top_k, bits, ratio):
    from expertkit.config import CompressionConfig
    from expertkit.federated.compress import compress, decode, payload_bytes, plain_payload

    g = torch.Generator().manual_seed(0)
    updates = [{"m.lora_B.weight": torch.randn(256, 16, generator=g)} for _ in range(5)]
    shapes = {"m.lora_B.weight": torch.Size([256, 16])}
    options = CompressionConfig(top_k=top_k, bits=bits)
    residual, sent = {}, torch.zeros(256, 16)
    for u in updates:
        payload, residual = compress(u, residual, options)
        sent += decode(payload, shapes, bits)["m.lora_B.weight"]
        assert payload_bytes(plain_payload(u)) >= ratio * payload_bytes(payload)
    # error feedback: what was sent plus what is still owed is exactly what the updates added up to
    torch.testing.assert_close(sent + residual["m.lora_B.weight"], sum(u["m.lora_B.weight"] for u in updates))


def test_cli_trains_the_silo_domain_federated_and_plain_train_skips_it(tmp_path, micro_base_dir, monkeypatch, capsys):
    project = federated_project(tmp_path, str(micro_base_dir))
    code, out, err = run_cli(monkeypatch, capsys, "train", project)
    assert code == 0 and "held in silos only" in err and "expert 'beta' ->" in err
    code, out, err = run_cli(monkeypatch, capsys, "train", project, "--federated", "--engine", "local")
    assert code == 0 and "federated expert 'alpha' ->" in err
    code, out, err = run_cli(monkeypatch, capsys, "eval", project)  # scored on the silos' text together
    assert code == 0 and "| alpha" in err + out, err


@pytest.mark.parametrize("case, fragments", [
    ("one silo", ("lists one silo only", "at least 2")),
    ("epsilon 0", ("federated.privacy.epsilon", "greater than 0")),
])
def test_bad_federated_configs_are_one_line(tmp_path, micro_base_dir, monkeypatch, capsys, case, fragments):
    project = federated_project(tmp_path, str(micro_base_dir))
    raw = yaml.safe_load(project.read_text())
    if case == "one silo":
        raw["domains"][0]["silos"] = raw["domains"][0]["silos"][:1]
    else:
        raw["federated"]["privacy"] = {"epsilon": 0}
    project.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--federated", "--engine", "local")
    assert_one_line_error(code, err, *fragments)


def test_a_silo_without_text_is_one_line_and_nothing_is_written(tmp_path, micro_base_dir, monkeypatch, capsys):
    docs = synthetic_documents("alpha", 120)
    project = federated_project(tmp_path, str(micro_base_dir), silo_docs=[docs[:40], [], docs[40:80], docs[80:]])
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--federated", "--engine", "local")
    assert_one_line_error(code, err, "alpha.s1", "empty")
    assert not (tmp_path / "library" / "experts").exists()


def test_a_client_on_another_base_is_refused_by_name(tmp_path, micro_base_dir, small_project):
    from expertkit.config import load_config
    from expertkit.federated.client import SiloClient
    from expertkit.federated.server import ClientRefused

    trainer, transport = trainer_and_transport(federated_project(tmp_path, str(micro_base_dir)), tmp_path)
    other = trainer.config.model_copy(update={"base": load_config(small_project).base})
    transport.clients["s3"] = SiloClient(other, "alpha", "s3", tmp_path / "s3")
    with pytest.raises(ClientRefused, match="silo 's3' runs on another base"):
        trainer.run(transport)
    assert not trainer.folder.exists()


def test_dp_clips_each_update_and_noises_the_sum_with_the_calibrated_std():
    from expertkit.federated import aggregate

    big, small = {"x": torch.full((1000,), 1.0)}, {"x": torch.full((1000,), 0.001)}
    clipped, before = aggregate.clip(big, 0.5)
    assert before == pytest.approx(math.sqrt(1000)) and aggregate.norm(clipped) == pytest.approx(0.5)
    assert torch.equal(aggregate.clip(small, 0.5)[0]["x"], small["x"])  # inside the bound: untouched
    g = torch.Generator().manual_seed(0)
    exact = aggregate.noisy_mean([clipped, small], 0.0, 4, g)["x"]
    torch.testing.assert_close(exact, (clipped["x"] + small["x"]) / 4)  # fixed denominator: the silos invited
    noisy = aggregate.noisy_mean([clipped, small], 2.0, 4, g)["x"]
    assert (noisy - exact).std().item() == pytest.approx(2.0 / 4, rel=0.1)


def test_noise_that_breaks_the_adapter_stops_the_run_with_a_clear_message(tmp_path, micro_base_dir):
    from expertkit.errors import ExpertkitError
    from expertkit.library import Library

    privacy = {"noise_multiplier": 1e30, "clip": 1e10}  # noise beyond float32: inf in the first round
    trainer, transport = trainer_and_transport(
        federated_project(tmp_path, str(micro_base_dir), federated={"privacy": privacy}), tmp_path)
    with pytest.raises(ExpertkitError, match="non-finite.*raise privacy.epsilon, add silos"):
        trainer.run(transport)
    assert not Library(trainer.config.library).has("expert", "alpha")


def test_federated_without_silos_or_with_an_unknown_engine_is_one_line(project, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--federated")
    assert_one_line_error(code, err, "no domain lists silos")
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--federated", "--executor", "ray")
    assert_one_line_error(code, err, "--federated runs the silos with --engine")


def test_the_written_federated_expert_keeps_the_recipes_strength(tmp_path, micro_base_dir):
    """training.strength applies to a federated expert as to a central one: the aggregate's B factors scaled."""
    from safetensors.torch import load_file

    project = federated_project(tmp_path, str(micro_base_dir))
    raw = yaml.safe_load(project.read_text())
    raw["training"]["strength"] = 0.5
    project.write_text(yaml.safe_dump(raw))
    trainer, _ = trainer_and_transport(project, tmp_path)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in trainer._initial_state().items()}
    trainer._write_adapter(state, tmp_path / "written")
    written = load_file(tmp_path / "written" / "adapter_model.safetensors")
    assert written.keys() == state.keys() and any(".lora_B." in k for k in state)
    for key, value in state.items():
        torch.testing.assert_close(written[key], value * (0.5 if ".lora_B." in key else 1.0))
