"""State kept between federated rounds, one file per round: a silo's AdamW moments and compression residual,
the server's checkpoints. Written atomically; the newest few are kept.

A round reads the newest file saved before it, so a round the server replays after a restart gets the answer
it got the first time.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from expertkit.fsutil import atomic_write_bytes


class RoundFiles:
    KEEP = 2

    def __init__(self, folder: Path, kind: str):
        self.folder, self.kind = Path(folder), kind

    def rounds(self) -> dict[int, Path]:
        return {int(p.stem.rsplit("-", 1)[1]): p for p in self.folder.glob(f"{self.kind}-*.pt")}

    def load(self, round_index: int) -> dict:
        return torch.load(self.rounds()[round_index], weights_only=True)

    def latest_before(self, round_index: int) -> dict | None:
        earlier = [r for r in self.rounds() if r < round_index]
        return self.load(max(earlier)) if earlier else None

    def save(self, round_index: int, value: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        atomic_write_bytes(self.folder / f"{self.kind}-{round_index:05d}.pt", buffer.getvalue())
        files = self.rounds()
        for r in sorted(files)[:-self.KEEP]:
            files[r].unlink(missing_ok=True)
