"""``python -m aqueduct calibrate``: what waiting costs on this host, and the spin budget a flow
chooses from it.

A flow's processes spin briefly before they sleep, when a wake-up costs much more than a spin
(see ARCHITECTURE.md, "Waiting"). Both costs depend on the host (a VM whose idle vCPUs halt
wakes far slower than bare metal, and a busy host faster than an idle one), so each process of a
flow measures the wake-ups it pays as it runs; this command measures the same costs on purpose,
for a person or a benchmark report.
"""

from __future__ import annotations

import argparse
import json

from . import _core

__all__ = ['main', 'measure']


def measure(rounds: int = 1000, processes: int = 2) -> dict[str, float]:
    """The host's wake-up and spin costs (µs, p50 and p99 over ``rounds`` round trips), its CPU
    count, and the spin budget a flow of ``processes`` busy processes would choose."""
    return _core.measure_host(rounds, processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m aqueduct calibrate', description=__doc__.split('\n\n')[0])
    parser.add_argument('--rounds', type=int, default=1000, help='round trips to time (default 1000)')
    parser.add_argument(
        '--processes', type=int, default=2, help="the flow's busy processes: workers + the main one (default 2)"
    )
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    args = parser.parse_args(argv)
    try:
        costs = measure(args.rounds, args.processes)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(costs))
        return 0
    print(f'CPUs: {costs["cpus"]}')
    print(f'wake-up of a parked process: p50 {costs["wake_p50_us"]:.1f} µs, p99 {costs["wake_p99_us"]:.1f} µs')
    hop_p50, hop_p99 = costs['spin_hop_p50_us'], costs['spin_hop_p99_us']
    print(f'hop between spinning processes: p50 {hop_p50:.2f} µs, p99 {hop_p99:.2f} µs')
    print(f'spin budget for {args.processes} busy processes: {costs["spin_budget_us"]:.0f} µs')
    return 0
