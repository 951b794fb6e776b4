"""Suite `specialize`: tiny base, one LoRA expert per non-general domain, perplexity scorecard.

Acceptance: each expert's own-domain test perplexity >= 20% below the base's, and its
general-domain perplexity within +3% of the base's.
"""

from __future__ import annotations

from pathlib import Path

from common import GENERAL, bench_config
from suites import suite

OWN_DOMAIN_GAIN = 0.20
GENERAL_TOLERANCE = 0.03


@suite("specialize")
def run(data: Path, device: str | None) -> dict:
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base, run_scorecard

    cfg = bench_config(data)
    cfg, base = load_project_base(cfg, device)
    train_all(cfg, base)
    experts = [d.name for d in cfg.domains]
    card = run_scorecard(cfg, base, out=Path(cfg.library).parent / (Path(cfg.library).name + "-scorecard"),
                         names=["base", *experts])
    ppl = card["ppl"]
    result = {"general_base_ppl": ppl["base"][GENERAL], "domains": {}, "checks": {}}
    print(f"\n{'domain':<12} {'base ppl':>9} {'expert ppl':>10} {'gain':>7} {'expert on general':>18} {'drift':>7}")
    for d in (d.name for d in cfg.domains):
        row = {"base_ppl": ppl["base"][d], "expert_ppl": ppl[d][d], "expert_general_ppl": ppl[d][GENERAL]}
        gain = 1 - row["expert_ppl"] / row["base_ppl"]
        drift = row["expert_general_ppl"] / result["general_base_ppl"] - 1
        row.update(gain=gain, general_drift=drift, passed=gain >= OWN_DOMAIN_GAIN and drift <= GENERAL_TOLERANCE)
        result["domains"][d] = row
        print(f"{d:<12} {row['base_ppl']:>9.2f} {row['expert_ppl']:>10.2f} {gain:>7.1%} "
              f"{row['expert_general_ppl']:>18.2f} {drift:>+7.1%}  {'PASS' if row['passed'] else 'MISS'}")
    result["all_passed"] = all(r["passed"] for r in result["domains"].values())
    result["config"] = cfg.model_dump()
    result["ppl"] = ppl
    print(f"general base perplexity {result['general_base_ppl']:.2f}; all domains pass: {result['all_passed']}")
    return result
