"""One entry point for every benchmark suite: `python benchmarks/run.py SUITE --out FILE.json [--data DIR]`.

A suite is a function registered in benchmarks/suites.py's SUITES by name; it prints its
table and returns the JSON-able result, which is written to --out with the exact versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_DATA, REAL_DOMAINS, REAL_RECIPE  # noqa: E402
from suites import (COLLABORATE_OPTIONS, MICRO, PORT_OPTIONS, REAL_BASES, ROUTE_OPTIONS, SUITES,  # noqa: E402
                    TASK_EXAMPLES)
from port import UPDATE_RATES  # noqa: E402  (registered by suites above)
from route import REAL_BLOCKS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with a 'general' folder and any number of domain folders (train/valid/test.txt)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--base", default=MICRO, help=f"{MICRO} (the tiny pretrained Llama of the earlier figures) "
                                                      f"or a real checkpoint: {', '.join(REAL_BASES)}")
    parser.add_argument("--large", default=None, help="collaborate: the large model (the same as --base)")
    parser.add_argument("--small", default=COLLABORATE_OPTIONS["small"],
                        help="collaborate on a real --large: 'distilled' (the companion `expertkit base distill` makes "
                             f"for it) or a real checkpoint with another vocabulary: {', '.join(REAL_BASES)}")
    parser.add_argument("--task-examples", type=int, default=TASK_EXAMPLES["per_task"],
                        help="examples per task where a suite measures task accuracy (all of a smaller task)")
    parser.add_argument("--domains", default=",".join(REAL_DOMAINS["chosen"]),
                        help="real bases: the domains whose experts the suites train (comma-separated)")
    parser.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="real bases: change one training setting of the suites' recipe (benchmarks/common.py "
                             "REAL_RECIPE), e.g. learning_rate=1e-4; repeat for more. Libraries are keyed by their "
                             "recipe, so the default recipe's experts stay cached beside these")
    parser.add_argument("--prompts", action="store_true",
                        help="route: measure routing of real prompts (general tasks -> base, domain tasks -> their "
                             "expert) instead of corpus documents")
    parser.add_argument("--route-blocks", type=int, default=ROUTE_OPTIONS["blocks"],
                        help="route: test blocks per domain, evenly spaced, in the perplexity comparisons (default: "
                             f"the evaluation's 96 on micro, {REAL_BLOCKS} on a real base, where the four routers and "
                             "the mixture over 96 blocks take hours on CPU)")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="route: train the routers and measure their accuracy and cost only, without the "
                             "perplexity comparisons and the held-out domain (an hour or more on a real base on CPU)")
    parser.add_argument("--update", choices=tuple(UPDATE_RATES), default=PORT_OPTIONS["update"],
                        help="port: the base update's strength (benchmarks/port.py UPDATES; mild = a tenth of the "
                             "strong learning rate)")
    args = parser.parse_args(argv)
    if args.route_blocks is not None and args.route_blocks < 1:
        parser.error(f"--route-blocks must be at least 1, not {args.route_blocks}")
    if args.large:
        if args.base not in (MICRO, args.large):
            parser.error("--large and --base name the same model; give one")
        args.base = args.large
    if args.recipe and args.base == MICRO:
        parser.error("--recipe changes the real-model recipe; the micro suites keep their own (give --base)")
    REAL_RECIPE.update(_recipe_changes(parser, args.recipe))
    COLLABORATE_OPTIONS["small"] = args.small
    ROUTE_OPTIONS["prompts"] = args.prompts
    ROUTE_OPTIONS["blocks"] = args.route_blocks
    ROUTE_OPTIONS["accuracy_only"] = args.accuracy_only
    PORT_OPTIONS["update"] = args.update
    TASK_EXAMPLES["per_task"] = args.task_examples
    REAL_DOMAINS["chosen"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())

    from expertkit.errors import ExpertkitError
    from expertkit.evaluate import environment
    from expertkit.quiet import quiet_libraries

    quiet_libraries()
    started = time.time()
    chosen = SUITES[args.suite]
    if args.base not in chosen.bases:
        print(f"error: suite '{args.suite}' runs on --base {' or '.join(chosen.bases)}, not '{args.base}'",
              file=sys.stderr)
        return 1
    try:
        result = chosen.run(args.data.resolve(), args.device, args.base)
    except ExpertkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["wall_seconds"] = round(time.time() - started, 1)
    result["environment"] = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwall time {result['wall_seconds']:.0f}s; results in {args.out}")
    return 0


def _recipe_changes(parser: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """`KEY=VALUE` pairs as a dict; a value is read as JSON (1e-4, 0.5, ["q_proj"]) or else kept as text."""
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            parser.error(f"--recipe takes KEY=VALUE (for example learning_rate=1e-4), not '{pair}'")
        try:
            changes[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            changes[key.strip()] = text
    return changes


if __name__ == "__main__":
    sys.exit(main())
