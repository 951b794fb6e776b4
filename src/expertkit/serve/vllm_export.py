"""The `vllm serve` command that serves a library's adapters under their library names.

With it, `expertkit serve LIBRARY --backend URL` can route in front of vLLM: the front
forwards each request with the chosen adapter's name as `model`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from expertkit.errors import ExpertkitError
from expertkit.library import Library

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def adapter_rank(path: Path) -> int:
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    return int(max(ranks))


def vllm_command(library_path: Path, base: str | None = None, served_base: str = "base", port: int = 8000) -> str:
    library = Library(library_path)
    adapters = [e for e in library.entries() if e.is_adapter]
    if not adapters:
        raise ExpertkitError(f"library {library.root} has no adapters to serve; train experts first")
    rank = max(adapter_rank(e.path) for e in adapters)
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise ExpertkitError(f"an adapter has rank {rank}; vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
    base_path = base or library.base_identity()["name"]
    args = ["vllm", "serve", base_path, "--served-model-name", served_base, "--port", str(port),
            "--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_rank),
            "--lora-modules", *[f"{e.name}={e.path.resolve()}" for e in adapters]]
    return shlex.join(args)
