"""Every pluggable kind is one Registry: a name registered twice is refused, an unknown one is named with the rest."""

from __future__ import annotations

import pytest

from expertkit.compose import register
from expertkit.compose.base import COMPOSITIONS
from expertkit.compose.collaborate import STRATEGIES, build_collaboration, collaboration
from expertkit.config import ProxyParams
from expertkit.errors import ExpertkitError
from expertkit.executors import get_executor
from expertkit.executors.base import EXECUTORS
from expertkit.executors.base import register as register_executor
from expertkit.merging.methods import METHODS, merge_method
from expertkit.registry import Registry
from expertkit.routing.base import ROUTERS, register_router, router_class

from test_cli import run_cli

REGISTRIES = {"composition": (COMPOSITIONS, lambda: register("expert")(lambda pool, entry: None)),
              "collaboration": (STRATEGIES, lambda: collaboration("proxy", ProxyParams)(lambda *a, **k: None)),
              "executor": (EXECUTORS, lambda: register_executor("local")(type("Twin", (), {}))),
              "merge method": (METHODS, lambda: merge_method("ties", mergekit="ties")(lambda d, w: None)),
              "router": (ROUTERS, lambda: register_router("lexical")(type("Twin", (), {})))}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_a_name_registered_twice_is_refused(kind):
    registry, register_again = REGISTRIES[kind]
    before = registry.items()
    with pytest.raises(ValueError, match="is registered twice"):
        register_again()
    assert registry.items() == before  # the first registration is kept untouched


def test_registered_classes_know_their_own_name():
    assert all(cls.kind == kind for kind, cls in ROUTERS.items()) and len(ROUTERS) >= 4
    assert all(cls.name == name for name, cls in EXECUTORS.items()) and len(EXECUTORS) >= 2
    stamped = Registry("widget").register("w", stamp="label")(type("Widget", (), {}))
    assert stamped.label == "w"


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ExpertkitError, match="unknown router kind 'nope'; known: arrow, embedding, lexical or "
                                             "likelihood"):
        router_class("nope")
    with pytest.raises(ExpertkitError, match=r"unknown executor 'nope'; known: local or ray"):
        get_executor("nope")
    with pytest.raises(ExpertkitError, match="choose one of card, defer, fusion or proxy"):
        build_collaboration("nope:alpha", None, None)
    registry = Registry("widget")
    registry.add("a", 1)
    assert registry["a"] == 1 and "a" in registry and list(registry) == ["a"] and registry.listing() == "a"


@pytest.mark.parametrize("args, registry", [(["router", "train", "--help"], ROUTERS),
                                            (["merge", "--help"], METHODS),
                                            (["train", "--help"], EXECUTORS),
                                            (["generate", "--help"], STRATEGIES)])
def test_cli_help_lists_what_is_registered(monkeypatch, capsys, args, registry):
    code, out, _ = run_cli(monkeypatch, capsys, *args)
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and all(name in text for name in registry.names()), (registry.names(), text)
