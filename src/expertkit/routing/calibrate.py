"""From probabilities to a choice: argmax, unless no expert is confident enough, then the base.

The threshold is calibrated the way RouteLLM calibrates its cost threshold: pick
the confidence below which the target share of validation prompts falls. Here
the validation prompts come from the experts' own domains, so the rate is the
share of in-library traffic we accept sending to the base in exchange for
catching prompts that no expert fits.
"""

from __future__ import annotations

import torch


def expert_confidence(probs: torch.Tensor) -> torch.Tensor:
    """[N] the highest probability of any expert (the base label, last, excluded)."""
    return probs[:, :-1].max(dim=-1).values


def decide(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] label index per row: the argmax, or the base (last label) when the best expert is below threshold."""
    base = probs.shape[1] - 1
    best = probs.argmax(dim=-1)
    unsure = expert_confidence(probs) < threshold
    return torch.where(unsure, torch.full_like(best, base), best)


def calibrate_threshold(confidence: torch.Tensor, abstain_rate: float) -> float:
    """A threshold with round(rate * N) of these confidences strictly below it (midway between neighbours)."""
    ordered = confidence.double().sort().values
    below = round(abstain_rate * len(ordered))
    if below == 0:
        return 0.0
    if below >= len(ordered):
        return float(ordered[-1]) + 1e-9
    return float((ordered[below - 1] + ordered[below]) / 2)


def accuracy(choices: torch.Tensor, targets: torch.Tensor) -> float:
    return float((choices == targets).float().mean()) if len(targets) else float("nan")
