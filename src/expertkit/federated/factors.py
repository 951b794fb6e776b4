"""Which LoRA factor the clients train in a round, so that averaging factors is averaging updates.

A client's update to a layer is ΔW = s·B·A. Averaging A and B separately is not averaging ΔW: the mean
of B_k·A_k is not mean(B)·mean(A) (the cross-term error expertkit's merges also avoid). When every client
keeps one factor fixed at the value the server sent, ΔW_k is linear in the other one, and the weighted
mean of that factor gives exactly the weighted mean of the clients' ΔW. Two schedules:

- "alternating" (RoLoRA): B in even rounds, A in odd rounds. Both factors learn, each round is exact.
  B first: with B = 0 at the start, A would get no gradient.
- "frozen_a" (FFA-LoRA): A stays at its random start, only B trains. Half the bytes, and the update is
  linear in what is noised, which suits differential privacy. ΔW only reaches the r directions A spans, so it
  wants a larger rank than a central expert (benchmarks/federated.py: rank 64 frozen beats rank 16 alternating).
"""

from __future__ import annotations

from typing import Callable

from expertkit.registry import Registry

A, B = "lora_A", "lora_B"

FACTOR_SCHEDULES: Registry[Callable[[int], str]] = Registry("federated aggregation")


@FACTOR_SCHEDULES.register("alternating")
def alternating(round_index: int) -> str:
    return B if round_index % 2 == 0 else A


@FACTOR_SCHEDULES.register("frozen_a")
def frozen_a(round_index: int) -> str:
    return B


def factor_keys(names, factor: str) -> list[str]:
    """The names (of a PEFT state dict or parameter list) that belong to `factor`."""
    return [n for n in names if f".{factor}." in n or n.endswith(f".{factor}")]
