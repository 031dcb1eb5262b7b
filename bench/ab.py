"""Before/after on the same host, in one run: the suite's scenarios for two source trees.

Each tree is a checkout of this repository with its extension built in place
(``python/aqueduct/_core.abi3.so``); runs alternate between the two so that the machine's drift
hits both alike. Prints, per scenario, the median of each side and their ratio (after / before,
"higher is better" scenarios as is, latencies inverted so that > 1 always means "after is
better"), with the host it ran on.

    python bench/ab.py --before ../before --after . --runs 5 \\
        --only latency_1step,throughput_1step_64,throughput_2step_64

The interpreter is this one (``sys.executable``); only ``PYTHONPATH`` differs between sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import machine_info  # noqa: E402  (the suite's host description)

DEFAULT = "latency_1step,throughput_1step_64,throughput_2step_64,socketflow_latency,socketflow_throughput_64"


def run_once(tree: Path, scenario: str, timeout: float) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(tree / "python")}
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / "scenarios.py"), scenario],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"  {scenario} in {tree}: failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    record = json.loads(lines[-1])
    module = record.get("impl", {}).get("module") or ""
    if not module.startswith(str(tree)):
        raise SystemExit(f"{scenario}: imported {module}, not the tree {tree}")
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=BENCH.parent)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default=DEFAULT)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    host = machine_info()
    print(f"host: {host['cpu_model']} ({host['nproc']} CPUs), {host['os']}, Python {host['runner_python']}")
    print("| scenario | before | after | after vs before | unit |\n|---|---|---|---|---|")
    for scenario in args.only.split(","):
        values: dict[str, list[float]] = {"before": [], "after": []}
        unit, lower = "", False
        for i in range(args.runs):
            for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                record = run_once(trees[side], scenario, args.timeout)
                if record is not None and record.get("value") is not None:
                    values[side].append(float(record["value"]))
                    unit, lower = record.get("unit", ""), record.get("better") == "lower"
        if not values["before"] or not values["after"]:
            print(f"| {scenario} | n/a | n/a | | |")
            continue
        before, after = statistics.median(values["before"]), statistics.median(values["after"])
        better = before / after if lower else after / before
        print(f"| {scenario} | {before:,.1f} | {after:,.1f} | {better:.2f}x | {unit} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
