"""Main-process instructions per task, counted by callgrind: a figure that does not depend on
the host (its speed, its wake-up cost, what else runs), beside the suite's times.

For each implementation and scenario, the flow runs ``--small`` and then ``--large`` tasks
under ``valgrind --tool=callgrind`` (every process of the flow runs under valgrind; only the
main process's count is read), and the difference of the two totals divided by the
difference in tasks is the cost of one task in steady state: interpreter start-up, imports,
``start()`` and ``stop()`` cancel out.

Each figure of ours is the median of ``--repeat`` measurements (see ``median_per_task``).

Spinning is switched off (``AQUEDUCT_SPIN_US=0``) so that only work is counted: a spin's
instruction count depends on how long the peer takes, which under valgrind says nothing.

    python bench/instructions.py                       # ours (.venv) and 1.15
    python bench/instructions.py --before ../before    # and another tree of ours (PYTHONPATH)
    python bench/instructions.py --only 1step_64 --json

Each run prints a Markdown table; ``--json`` prints the figures as one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from run import ensure_baseline  # noqa: E402  (the suite's set-up of the 1.15 venv)

OURS = ROOT / ".venv" / "bin" / "python"
BASELINE = BENCH / ".venv-aqueduct115" / "bin" / "python"

# name: (steps, tasks in flight)
SCENARIOS = {"1step_sequential": (1, 1), "1step_64": (1, 64), "2step_64": (2, 64), "1step_256": (1, 256)}

CHILD = r'''
import asyncio, sys
sys.path.insert(0, {bench!r})
from scenarios import AddOneHandler, IncHandler, NumTask
from aqueduct import Flow, FlowStep

async def main(steps, in_flight, total):
    flow = Flow(*[FlowStep(IncHandler() if i == 0 else AddOneHandler()) for i in range(steps)])
    started = flow.start()
    if started is not None:  # 1.15's start() is a coroutine
        await started
    todo = iter(range(total))

    async def client():
        for i in todo:
            task = NumTask(i)
            await flow.process(task, timeout_sec=600)
            assert task.result == i + steps, (task.result, i)

    await asyncio.gather(*(client() for _ in range(in_flight)))
    stopped = flow.stop()
    if stopped is not None:
        await stopped

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
'''


def count(python: str, steps: int, in_flight: int, tasks: int, env: dict[str, str]) -> int:
    """Instructions of the main process for a run of ``tasks`` tasks."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}/cg.%p",
            python,
            "-c",
            CHILD.format(bench=str(BENCH)),
            str(steps),
            str(in_flight),
            str(tasks),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{python} failed ({proc.returncode}): {err[-2000:]}")
        main_file = Path(out) / f"cg.{proc.pid}"
        text = main_file.read_text(errors="replace")
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        if not found:
            raise RuntimeError(f"no instruction total in {main_file}")
        return int(found.group(1))


def per_task(python: str, steps: int, in_flight: int, small: int, large: int, env: dict[str, str]) -> float:
    return (count(python, steps, in_flight, large, env) - count(python, steps, in_flight, small, env)) / (large - small)


def median_per_task(repeat: int, *args) -> tuple[float, float, float]:
    """Median, lowest and highest of ``repeat`` measurements. The count is not fixed: how many
    tasks each poll of the event loop finds ready depends on how fast the processes run under
    valgrind, and every pass of the loop costs the same whatever it finds (about ±10% here)."""
    values = sorted(per_task(*args) for _ in range(repeat))
    return values[len(values) // 2], values[0], values[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", default=str(OURS))
    parser.add_argument("--baseline", default=str(BASELINE), help="aqueduct 1.15's interpreter ('' to skip)")
    parser.add_argument("--before", help="another source tree of ours, run with PYTHONPATH=<tree>/python")
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=3, help="measurements of ours per figure (median)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")

    base_env = {**os.environ, "AQUEDUCT_SPIN_US": "0"}
    base_env.pop("PYTHONPATH", None)
    sides: list[tuple[str, str, dict[str, str]]] = [("aqueduct-rs", args.ours, base_env)]
    if args.before:
        before = str(Path(args.before).resolve() / "python")
        sides.append(("aqueduct-rs before", args.ours, {**base_env, "PYTHONPATH": before}))
    if args.baseline:
        error = ensure_baseline(args.baseline)
        if error or not Path(args.baseline).exists():
            parser.error(f"aqueduct 1.15's interpreter {args.baseline}: {error or 'missing'} (--baseline '' skips it)")
        sides.append(("aqueduct 1.15", args.baseline, base_env))

    figures: dict[str, dict[str, float]] = {}
    for name in names:
        steps, in_flight = SCENARIOS[name]
        for label, python, env in sides:
            # aqueduct 1.15 is measured once: ten times our count, and as many times slower.
            repeat = 1 if label == "aqueduct 1.15" else max(1, args.repeat)
            value, low, high = median_per_task(repeat, python, steps, in_flight, args.small, args.large, env)
            figures.setdefault(name, {})[label] = round(value)
            spread = f" ({low:,.0f}-{high:,.0f})" if repeat > 1 else ""
            print(f"{name:<18} {label:<20} {value:,.0f} instructions/task{spread}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(figures))
        return 0
    labels = [label for label, _, _ in sides]
    print("| scenario | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for name, row in figures.items():
        print(f"| {name} | " + " | ".join(f"{row[label]:,.0f}" for label in labels) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
