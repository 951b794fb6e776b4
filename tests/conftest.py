"""Shared fixtures: synthetic domain corpora, a micro base built in seconds, a project YAML writer."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from expertkit.quiet import quiet_libraries

quiet_libraries()

WORDS = {
    "general": "the a of and to in is was for on that with as by at from it his an were are which this be".split(),
    "alpha": "patient dose trial cohort tumor clinical therapy risk blood cells serum renal cardiac mg".split(),
    "beta": "def return self import for in if else print list dict range len class none true".split(),
}


def synthetic_documents(domain: str, n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences from a domain's own word list (plus a few common words)."""
    rng = random.Random(f"{domain}-{seed}")
    words = WORDS[domain] + WORDS["general"][:5]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(12, 30))) + "." for _ in range(n)]


def write_corpus(folder: Path, domain: str, n: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{domain}.txt"
    path.write_text("\n".join(synthetic_documents(domain, n)) + "\n", encoding="utf-8")
    return path


MICRO_BUILD = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
               "context_length": 64, "steps": 8, "batch_size": 4, "corpus": {"general": 1.0}}
MICRO_TRAIN = {"rank": 4, "alpha": 8, "steps": 6, "batch_size": 4, "block_size": 32, "checkpoint_every": 3,
               "learning_rate": 5e-3, "replay": 0.25}


def project_dict(root: Path, base_path: str, domains=("alpha", "beta"), **overrides) -> dict:
    data = root / "data"
    raw = {
        "base": {"path": base_path, "build": dict(MICRO_BUILD)},
        # synthetic documents are one per line (a file without empty lines is otherwise one running text)
        "general": {"name": "general", "source": {"path": str(write_corpus(data, "general")), "documents": "line"}},
        "domains": [{"name": d, "source": {"path": str(write_corpus(data, d)), "documents": "line"}}
                    for d in domains],
        "training": dict(MICRO_TRAIN),
        "evaluation": {"block_size": 32, "batch_size": 8, "max_blocks": 4, "context_tokens": 8},
        "library": str(root / "library"),
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def write_project(root: Path, base_path: str, **overrides) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "project.yaml"
    path.write_text(yaml.safe_dump(project_dict(root, base_path, **overrides)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def micro_base_dir(tmp_path_factory) -> Path:
    """A micro Llama base (about 40k parameters) built once per test session."""
    from expertkit.build import build_base
    from expertkit.config import load_config

    root = tmp_path_factory.mktemp("micro")
    cfg = load_config(write_project(root, str(root / "base")))
    return build_base(cfg)


@pytest.fixture
def project(tmp_path, micro_base_dir) -> Path:
    """A project YAML over synthetic corpora that uses the shared micro base."""
    return write_project(tmp_path, str(micro_base_dir))


@pytest.fixture
def trained(project):
    """(config, base, library) with both experts trained."""
    from expertkit.library import Library
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    cfg, base = load_project_base(project)
    train_all(cfg, base)
    return cfg, base, Library(cfg.library)


@pytest.fixture(scope="session")
def small_project(tmp_path_factory, micro_base_dir) -> Path:
    """The project of a 16-wide small base sharing the micro base's tokenizer, with expert 'alpha' trained."""
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    root = tmp_path_factory.mktemp("collab")
    small_build = {**MICRO_BUILD, "hidden_size": 16, "intermediate_size": 32, "tokenizer": str(micro_base_dir)}
    project = write_project(root, str(root / "small"), domains=("alpha",), base={"build": small_build},
                            training={"steps": 20})
    cfg, small = load_project_base(project)
    train_all(cfg, small)
    return project


@pytest.fixture(scope="session")
def two_vocabularies(tmp_path_factory, micro_base_dir):
    """(large = the micro base, 300 tokens; small = a 16-wide base with its OWN 320-token tokenizer + 'alpha')."""
    from expertkit.base import load_base
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    root = tmp_path_factory.mktemp("vocab")
    build = {**MICRO_BUILD, "vocab_size": 320, "hidden_size": 16, "intermediate_size": 32}
    project = write_project(root, str(root / "small"), domains=("alpha",), base={"build": build},
                            training={"steps": 12})
    cfg, small = load_project_base(project)
    train_all(cfg, small)
    return ExpertPool(load_base(str(micro_base_dir))), ExpertPool(small, Library(cfg.library))


@pytest.fixture(scope="session")
def served_library(tmp_path_factory, micro_base_dir):
    """(config, library path): two micro experts and a lexical router on the micro base (read-only users)."""
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base, run_router_train

    root = tmp_path_factory.mktemp("serve")
    cfg, base = load_project_base(write_project(root, str(micro_base_dir)))
    train_all(cfg, base)
    run_router_train(cfg, base, "lexical", "router-lexical")
    return cfg, Path(cfg.library)


@pytest.fixture(scope="session")
def sentence_library(tmp_path_factory):
    """Two experts and a linear and a TIES merge of them, on a micro base trained enough to end sentences.

    (The shared micro base is too weak to ever predict end-of-text, the path this test must exercise.)
    """
    from expertkit.build import build_base
    from expertkit.config import load_config
    from expertkit.library import Library
    from expertkit.merging import make_recipe, merge_experts
    from expertkit.runtime import ExpertPool
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    root = tmp_path_factory.mktemp("exact")
    build = {**MICRO_BUILD, "steps": 200, "corpus": {"general": 0.5, "alpha": 0.25, "beta": 0.25}}
    project = write_project(root, str(root / "base"), base={"build": build}, training={"steps": 30})
    build_base(load_config(project))
    cfg, base = load_project_base(project)
    train_all(cfg, base)
    library = Library(cfg.library)
    pool = ExpertPool(base, library)
    merge_experts(pool, library, make_recipe(method="linear", experts=["alpha", "beta"], weights=[0.7, 0.3]),
                  "m-linear")
    merge_experts(pool, library, make_recipe(method="ties", experts=["alpha", "beta"], density=0.5), "m-ties")
    return library


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def assert_cached_steps_match(composition, ids, mask, split: int) -> None:
    """Prefill ids[:, :split], then step through the rest: the last logits equal one prefill of everything."""
    import torch

    logits, state = composition.prefill(ids[:, :split], mask[:, :split])
    for t in range(split, ids.shape[1]):
        logits, state = composition.step(state, ids[:, t])
    full, _ = composition.prefill(ids, mask)
    torch.testing.assert_close(logits, full[:, -1], rtol=1e-4, atol=1e-4)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `expertkit ARGS` run in this process."""
    from expertkit import cli

    monkeypatch.setattr(sys, "argv", ["expertkit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """A user's mistake: exit 1, one `error:` line naming it (each fragment in it), no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert all(f in lines[0] for f in fragments), err
    assert "Traceback" not in err
