"""Executors: local (default, no Ray needed) and Ray (a local 2-CPU instance, one per module).

Training on Ray must give the experts of a sequential run, survive a killed
worker by resuming from its checkpoint, and refuse bad set-ups before training.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from expertkit.base import BaseSpec
from expertkit.executors import Context, get_executor
from expertkit.library import Library
from expertkit.train import train_all
from expertkit.workflow import library_trial_state, load_project_base, run_scorecard, validation_blocks

from conftest import project_dict, read_json, synthetic_documents, write_project
from test_cli import assert_one_line_error, run_cli

ray = pytest.importorskip("ray")

FOUR = ("alpha", "beta", "alpha", "beta")  # word lists of the four micro domains (each with its own seed)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_executor(ray_session):
    with get_executor("ray") as executor:  # joins the module's session, so closing it leaves Ray running
        yield executor


def four_domain_project(root: Path, base_dir: Path) -> Path:
    raw = project_dict(root, str(base_dir))
    data = root / "data"
    raw["domains"] = []
    for i, words in enumerate(FOUR):
        path = data / f"d{i}.txt"
        path.write_text("\n".join(synthetic_documents(words, 120, seed=i + 1)) + "\n", encoding="utf-8")
        raw["domains"].append({"name": f"d{i}", "source": {"path": str(path)}})
    (root / "project.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return root / "project.yaml"


def adapter(library_dir, name: str) -> dict:
    return load_file(str(Path(library_dir) / "experts" / name / "adapter_model.safetensors"))


def assert_same_adapters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_four_experts_on_ray_equal_the_sequential_ones(tmp_path, micro_base_dir, ray_executor):
    cfg, base = load_project_base(four_domain_project(tmp_path / "seq", micro_base_dir))
    train_all(cfg, base)
    cfg_ray, base_ray = load_project_base(four_domain_project(tmp_path / "ray", micro_base_dir))
    entries = train_all(cfg_ray, base_ray, executor=ray_executor)
    assert [e.name for e in entries] == ["d0", "d1", "d2", "d3"]
    library = Library(cfg_ray.library)
    assert [e["name"] for e in read_json(library.index_path)["entries"]] == ["d0", "d1", "d2", "d3"]
    for e in entries:
        assert_same_adapters(adapter(cfg.library, e.name), adapter(cfg_ray.library, e.name))
        assert e.manifest["resumed_from_step"] == 0
        assert not library.checkpoint_dir(e.name).exists()  # staged adapter and checkpoints are cleaned up
    assert not list((library.root / "experts").glob(".tmp-*"))


def _kill_worker_once(checkpoints: Path, task: str, killed: list) -> None:
    """Once the first checkpoint exists, SIGKILL the Ray worker process running `task` (a descendant of ours)."""
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("step-*/meta.json")):
        time.sleep(0.01)
    for proc in psutil.Process().children(recursive=True):
        try:
            if "".join(proc.cmdline()).startswith(f"ray::{task}"):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        except psutil.Error:
            continue


def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, micro_base_dir, ray_executor):
    long = {"steps": 400, "checkpoint_every": 20}
    killed_project = write_project(tmp_path / "killed", str(micro_base_dir), domains=("alpha",), training=long)
    clean_project = write_project(tmp_path / "clean", str(micro_base_dir), domains=("alpha",), training=long)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_once,
                              args=(tmp_path / "killed" / "library" / ".checkpoints" / "alpha", "expert alpha",
                                    killed))
    killer.start()
    cfg, base = load_project_base(killed_project)
    (entry,) = train_all(cfg, base, executor=ray_executor)
    killer.join()
    assert killed, "the worker finished before it could be killed"
    assert entry.manifest["resumed_from_step"] >= 20  # the retry started from a checkpoint, not from scratch
    cfg_clean, base_clean = load_project_base(clean_project)
    train_all(cfg_clean, base_clean)
    assert_same_adapters(adapter(cfg.library, "alpha"), adapter(cfg_clean.library, "alpha"))


def test_scorecard_and_search_trials_on_ray_match_local(trained, ray_executor, tmp_path):
    from expertkit.merging.search import search

    cfg, base, library = trained
    local = run_scorecard(cfg, base, out=tmp_path / "local")["ppl"]
    remote = run_scorecard(cfg, base, out=tmp_path / "ray", executor=ray_executor)["ppl"]
    assert local.keys() == remote.keys() == {"base", "alpha", "beta"}
    for name in local:
        assert remote[name] == pytest.approx(local[name], rel=1e-4)
    valid = validation_blocks(cfg, base.tokenizer, ["alpha", "beta"])
    context = Context(partial(library_trial_state, BaseSpec.of(base), str(library.root.resolve()),
                              ["alpha", "beta"], valid, cfg.evaluation.batch_size))
    (first,) = search(["alpha", "beta"], context, budget_seconds=0).trials  # local: one trial at a time
    spread = search(["alpha", "beta"], context, budget_seconds=0, executor=ray_executor).trials
    assert len(spread) == ray_executor.slots == 2  # the first grid chunk ran as two parallel jobs
    same = next(t for t in spread if t.recipe == first.recipe)
    assert same.ppl == pytest.approx(first.ppl, rel=1e-4)


def test_cli_eval_and_merge_search_on_ray(monkeypatch, capsys, trained, project, tmp_path, ray_session):
    code, _, err = run_cli(monkeypatch, capsys, "eval", project, "--out", tmp_path / "card", "--executor", "ray")
    assert code == 0, err
    assert set(read_json(tmp_path / "card" / "scorecard.json")["ppl"]) == {"base", "alpha", "beta"}
    code, _, err = run_cli(monkeypatch, capsys, "merge", project, "--search", "--budget", "1", "--name", "found",
                           "--executor", "ray")
    assert code == 0, err
    assert trained[2].get("found").manifest["search"]["trials"] >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_clear_error_before_training(monkeypatch, capsys, project):
    port = _free_port()
    started = time.time()
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert_one_line_error(code, err, f"cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert time.time() - started < 30
    assert not (project.parent / "library").exists()


def test_library_the_workers_cannot_see_is_one_clear_error(monkeypatch, capsys, project, tmp_path, ray_session):
    from expertkit.executors import ray_executor

    driver_only = tmp_path / "driver-only-disk"
    driver_only.mkdir()

    def token_on_a_driver_only_disk(folder, token):  # what a driver-local library looks like from another node
        path = driver_only / f"{ray_executor.PROBE_PREFIX}{token}"
        path.write_text(token)
        return path

    monkeypatch.setattr(ray_executor, "write_token", token_on_a_driver_only_disk)
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--executor", "ray")
    library = (project.parent / "library").resolve()
    assert_one_line_error(code, err, f"cannot see the library at {library}")
    assert "shared disk" in err
    assert not (library / "experts").exists() and not (library / ".checkpoints").exists()


@pytest.mark.parametrize("args, message", [
    (["--executor", "dask"], "unknown executor 'dask'; known: local or ray"),
    (["--address", "10.0.0.1:6379"], "--address is not an option of the 'local' executor"),
    (["--executor", "ray", "--gpus-per-job", "64"], "no node of the Ray cluster has the 1 CPUs and 64 GPUs"),
])
def test_bad_executor_options(monkeypatch, capsys, project, ray_session, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "train", project, *args)
    assert_one_line_error(code, err, message)


def test_ray_executor_without_ray_says_how_to_install_it(monkeypatch, capsys, project):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    code, _, err = run_cli(monkeypatch, capsys, "train", project, "--executor", "ray")
    assert_one_line_error(code, err, "pip install 'expertkit[ray]'")


def test_local_executor_needs_no_ray(project):
    script = ("import sys; sys.modules['ray'] = None\n"
              "from expertkit.cli import main\n"
              f"sys.argv = ['expertkit', 'train', {str(project)!r}, '--only', 'alpha']\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert (project.parent / "library" / "experts" / "alpha" / "adapter_model.safetensors").is_file()
