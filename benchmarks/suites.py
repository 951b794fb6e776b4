"""The registry of benchmark suites. Add a suite with `@suite("name")` on a function (data, device) -> dict."""

from __future__ import annotations

from typing import Callable

from expertkit.registry import Registry

SUITES: Registry[Callable] = Registry("benchmark suite")


def suite(name: str):
    return SUITES.register(name)


import collaborate  # noqa: E402,F401  (each suite module registers itself)
import merge  # noqa: E402,F401
import route  # noqa: E402,F401
import scale  # noqa: E402,F401
import serve  # noqa: E402,F401
import specialize  # noqa: E402,F401
