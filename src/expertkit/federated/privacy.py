"""Differential privacy at the silo: the noise for a target ε, and the ε spent after each round.

The mechanism is DP-FedAvg's (user-level DP, the "user" being a whole silo): each client's round update is
clipped to L2 norm `clip`, the server adds Gaussian noise of std noise_multiplier·clip to their sum, and
divides by the number of clients invited. Every silo takes part in every round (sampling rate 1), so a run
of R rounds is R Gaussian mechanisms; Opacus' RDP accountant composes them and converts to (ε, δ).
"""

from __future__ import annotations

import warnings

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from expertkit.config import PrivacyConfig
from expertkit.errors import ExpertkitError

SAMPLE_RATE = 1.0  # every silo in every round


class PrivacyLedger:
    """The noise a run uses, and the ε it has spent."""

    def __init__(self, options: PrivacyConfig, planned_rounds: int):
        self.options = options
        with warnings.catch_warnings():  # at a very large ε Opacus notes its bound could be tighter: still a bound
            warnings.simplefilter("ignore", UserWarning)
            self.noise_multiplier = options.noise_multiplier or get_noise_multiplier(
                target_epsilon=options.epsilon, target_delta=options.delta, sample_rate=SAMPLE_RATE,
                steps=planned_rounds, accountant="rdp")
        if options.epsilon is not None and self.epsilon_after(1) > options.epsilon:
            raise ExpertkitError(f"privacy: noise_multiplier {self.noise_multiplier:g} spends ε = "
                                 f"{self.epsilon_after(1):.3g} in one round, more than the target ε = "
                                 f"{options.epsilon:g}: raise noise_multiplier or epsilon")

    @property
    def noise_std(self) -> float:
        """The std of the Gaussian noise added to the sum of the clipped updates."""
        return self.noise_multiplier * self.options.clip

    def epsilon_after(self, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, SAMPLE_RATE, rounds)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(self.options.delta))

    def allows(self, rounds: int) -> bool:
        """Whether `rounds` rounds in all stay within the target ε (always, without a target)."""
        return self.options.epsilon is None or self.epsilon_after(rounds) <= self.options.epsilon

    def describe(self, rounds: int) -> dict:
        return {"epsilon": self.epsilon_after(rounds), "delta": self.options.delta, "clip": self.options.clip,
                "noise_multiplier": self.noise_multiplier, "target_epsilon": self.options.epsilon,
                "rounds": rounds, "level": "silo (user-level: a whole silo's data)"}
