"""Suite `scale`: two experts on two Ray workers (one torch thread each) vs the same two in sequence.

Two sequential baselines: one torch thread (the like-for-like comparison of the work each worker does) and
torch's default threads (what `expertkit train` does when a user does not use Ray). All runs happen side by
side in this process, on the cached `specialize` base and the first two domains, with
the `specialize` recipe and seeds. Acceptance: speedup = sequential_s / ray_s >= 1.6, and the experts of both runs are
equal. ray_s is the whole `train_all` on the Ray executor, so it includes what a worker pays before its first
step (importing torch, loading the base, receiving the data); starting Ray itself is timed apart (ray_start_s),
since a cluster is started once and then serves many runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import CACHE, bench_config
from suites import suite

WORKERS = 2
RECIPE = None  # the `specialize` recipe (300 steps of 16 x 128 tokens, LoRA r=16 on every projection)
TARGET_SPEEDUP = 1.6


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _max_abs_diff(a_dir: Path, b_dir: Path, names: list[str]) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for name in names:
        a = load_file(str(a_dir / "experts" / name / "adapter_model.safetensors"))
        b = load_file(str(b_dir / "experts" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        worst = max([worst, *((a[k] - b[k]).abs().max().item() for k in a)])
    return worst


@suite("scale")
def run(data: Path, device: str | None) -> dict:
    import ray
    import torch

    from expertkit.executors import get_executor
    from expertkit.library import Library
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base

    cfg = bench_config(data, recipe=RECIPE)
    domains = [d.name for d in cfg.domains][:WORKERS]
    scratch = CACHE / "scale"
    shutil.rmtree(scratch, ignore_errors=True)  # both runs must train from scratch
    configs = {mode: cfg.model_copy(update={"library": str(scratch / mode)})
               for mode in ("sequential", "sequential_default_threads", "ray")}
    threads = torch.get_num_threads()
    _, base = load_project_base(configs["sequential"], device)
    default_s = _timed(lambda: train_all(configs["sequential_default_threads"], base, only=domains))
    torch.set_num_threads(1)
    try:
        sequential_s = _timed(lambda: train_all(configs["sequential"], base, only=domains))
        ray_start_s = _timed(lambda: ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR"))
        try:
            with get_executor("ray", cpus_per_job=1) as executor:
                ray_s = _timed(lambda: train_all(configs["ray"], base, only=domains, executor=executor))
        finally:
            ray.shutdown()
    finally:
        torch.set_num_threads(threads)
    diff = _max_abs_diff(scratch / "sequential", scratch / "ray", domains)
    seconds = {mode: {e.name: e.manifest["train_seconds"] for e in Library(c.library).entries()}
               for mode, c in configs.items()}
    speedup = sequential_s / ray_s
    result = {
        "sequential_s": round(sequential_s, 2), "ray_s": round(ray_s, 2), "speedup": round(speedup, 3),
        "sequential_default_threads_s": round(default_s, 2), "default_threads": threads,
        "speedup_vs_default_threads": round(default_s / ray_s, 3),
        "ray_start_s": round(ray_start_s, 2), "target_speedup": TARGET_SPEEDUP, "passed": speedup >= TARGET_SPEEDUP,
        "experts": domains, "workers": WORKERS, "torch_threads_per_worker": 1, "sequential_torch_threads": 1,
        "recipe": {**cfg.training.model_dump()}, "train_seconds_per_expert": seconds,
        "max_abs_diff_ray_vs_sequential": diff, "experts_equal": diff <= 1e-4, "ray_version": ray.__version__,
    }
    print(f"\n{'run':<34} {'wall s':>8}  per-expert training s (inside the job)")
    print(f"{f'sequential, {threads} threads (default)':<34} {default_s:>8.1f}  "
          f"{seconds['sequential_default_threads']}")
    print(f"{'sequential, 1 thread':<34} {sequential_s:>8.1f}  {seconds['sequential']}")
    print(f"{f'ray, {WORKERS} workers x 1 thread':<34} {ray_s:>8.1f}  {seconds['ray']}")
    print(f"speedup vs the default sequential run {default_s / ray_s:.2f}x; vs 1 thread in sequence "
          f"{speedup:.2f}x (target {TARGET_SPEEDUP}x: {'PASS' if result['passed'] else 'MISS'}); "
          f"ray start {ray_start_s:.1f}s (not included); max |Δ| ray vs sequential {diff:.2e}")
    return result
