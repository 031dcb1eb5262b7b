"""Benchmark orchestrator: aqueduct-rs versus the original aqueduct 1.15.

Usage::

    python bench/run.py [--quick] [--runs N] [--only scen1,scen2]
                        [--ours PATH_TO_PYTHON] [--baseline PATH_TO_PYTHON]
    python bench/run.py --report-only          # re-render docs from results/latest.json

Every (scenario, implementation, run) executes ``bench/scenarios.py`` in a fresh
subprocess (its own process group, killed on timeout), implementations interleaved
run by run so that they share the machine's noise. Medians and ratios go to
``bench/results/latest.json``; ``docs/benchmarks.md`` and ``docs/benchmarks.png`` are
regenerated from them.

Only the standard library is required; matplotlib is optional (no chart without it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SCENARIOS_PY = BENCH_DIR / "scenarios.py"
SETUP_BASELINE = BENCH_DIR / "setup_baseline.sh"
DEFAULT_OURS = ROOT / ".venv" / "bin" / "python"
DEFAULT_BASELINE = BENCH_DIR / ".venv-aqueduct115" / "bin" / "python"
DEFAULT_RESULTS = BENCH_DIR / "results" / "latest.json"
DEFAULT_DOCS = ROOT / "docs"

# Implementation keys, their display labels and the order of table columns.
OURS, BASELINE, PPE = "ours", "baseline", "ppe"
LABELS = {OURS: "aqueduct-rs", BASELINE: "aqueduct 1.15", PPE: "ProcessPoolExecutor"}

# After a scenario's main process exited, its descendants get this long to go away on
# their own (e.g. a resource tracker unlinking shared memory) before being killed.
STRAGGLER_GRACE_S = 3.0


# --------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A scenario of bench/scenarios.py and how to run it."""

    name: str
    description: str
    impls: tuple[str, ...] = (OURS, BASELINE)
    timeout_quick_s: float = 60.0
    timeout_full_s: float = 150.0


SPECS: list[Spec] = [
    Spec("latency_1step", "1 trivial step, sequential `process()` calls; p50/p99 round trip"),
    Spec("throughput_1step_64", "1 trivial step, 64 tasks in flight, default queue size"),
    Spec(
        "throughput_1step_64_nometrics",
        "`throughput_1step_64` with `metrics_enabled=False` (aqueduct-rs only: the cost of metrics)",
        (OURS,),
    ),
    Spec("throughput_1step_256", "1 trivial step, 256 tasks in flight, default queue size"),
    Spec("throughput_2step_64", "2 trivial steps, 64 tasks in flight, default queue size"),
    Spec("throughput_2step_256", "2 trivial steps, 256 tasks in flight, default queue size"),
    Spec("payload_1mb_2step", "1 MiB uint8 array through 2 steps, 4 in flight, no `share_value`"),
    Spec("payload_16mb_2step", "16 MiB uint8 array through 2 steps, 4 in flight, no `share_value`"),
    Spec("payload_1mb_2step_shared", "1 MiB array, 2 steps, 4 in flight, `task.share_value('arr')` first"),
    Spec("payload_16mb_2step_shared", "16 MiB array, 2 steps, 4 in flight, `task.share_value('arr')` first"),
    Spec(
        "payload_16mb_2step_work",
        "16 MiB array, 2 steps that each compute `arr.mean()` (timed alone first), 4 in flight, no `share_value`",
    ),
    Spec("batching_t0", "batch_size=16, batch_timeout=0, handler sleeps 2 ms + 0.5 ms/task, 64 in flight"),
    Spec("batching_t10ms", "batch_size=16, batch_timeout=10 ms, same handler, 64 in flight"),
    Spec("cpu_2ms_nprocs2", "2 ms pure-Python CPU spin per task, 1 step with nprocs=2, 16 in flight"),
    Spec("ppe_cpu_2ms", "the same spin via `ProcessPoolExecutor(2)` + `run_in_executor`, 16 in flight", (PPE,)),
    Spec("start_stop", "`flow.start()` and graceful `await flow.stop()` of an idle 1-step flow"),
    Spec("idle_cpu", "CPU of main + all child processes of an idle 2-step flow over 3 s"),
    Spec(
        "soak_memory",
        "small tasks through 2 steps (≥20k tasks and ≥8 s); RSS of main + children after warm-up",
        timeout_full_s=240.0,
    ),
    Spec("socketflow_latency", "`SocketFlow` (one flow shared by processes): 1 trivial step, sequential calls; p50"),
    Spec("socketflow_throughput_64", "`SocketFlow`: 1 trivial step, 64 tasks in flight from one client process"),
    Spec(
        "host_calibration",
        "what a wake-up of a parked process and a spinning hop cost on this host (`python -m aqueduct calibrate`)",
        (OURS,),
    ),
    *[
        Spec(f"{name}+burner", f"`{name}` with one CPU-bound process beside it (`while True: pass`)", impls)
        for name, impls in (
            ("latency_1step", (OURS, BASELINE)),
            ("throughput_1step_64", (OURS, BASELINE)),
            ("throughput_2step_64", (OURS, BASELINE)),
            ("payload_16mb_2step", (OURS, BASELINE)),
            ("host_calibration", (OURS,)),
        )
    ],
    # Diagnostics (only with --only): check that broken scenarios are recorded, not fatal.
    Spec("selftest_raise", "diagnostic: always raises", timeout_quick_s=30.0),
    Spec("selftest_hang", "diagnostic: hangs forever with a running flow", timeout_quick_s=20.0, timeout_full_s=20.0),
]
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
DEFAULT_SCENARIOS = [spec.name for spec in SPECS if not spec.name.startswith("selftest_")]


# --------------------------------------------------------------------------------------
# Aims: how each row of the table is judged
# --------------------------------------------------------------------------------------


@dataclass
class AimResult:
    met: bool | None  # None: cannot tell (missing data)
    detail: str
    # The speed-up versus 1.15 (same scenario) that meeting the aim implies; drawn as
    # the aim marker in the chart.
    required_speedup: float | None = None


class Medians:
    """Look-up of median values: ``get(scenario, impl, key)``."""

    def __init__(self, table: dict[tuple[str, str, str], float | None]):
        self._table = table

    def get(self, scenario: str, impl: str, key: str = "value") -> float | None:
        return self._table.get((scenario, impl, key))


def speedup(ours: float | None, base: float | None, better: str) -> float | None:
    """How many times better ours is than base, whatever the metric's direction."""
    if ours is None or base is None:
        return None
    if better == "higher":
        return ours / base if base > 0 else None
    return base / ours if ours > 0 else None


def fmt_x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}x" if value < 100 else f"{value:,.0f}x"


@dataclass(frozen=True)
class Aim:
    text: str
    evaluate: Callable[[Medians, Row], AimResult]


def aim_speedup(factor: float, vs_scenario: str | None = None) -> Callable[[Medians, Row], AimResult]:
    """Ours must be ``factor`` times better than 1.15 (optionally 1.15 in another scenario)."""

    def evaluate(med: Medians, row: Row) -> AimResult:
        ours = med.get(row.scenario, OURS, row.key)
        base_same = med.get(row.scenario, BASELINE, row.key)
        base_ref = med.get(vs_scenario or row.scenario, BASELINE, row.key)
        achieved = speedup(ours, base_ref, row.better)
        required = factor
        if vs_scenario and base_ref and base_same:
            # Express the aim as a speed-up versus 1.15 in *this* scenario, for the chart.
            required = factor * (base_ref / base_same if row.better == "higher" else base_same / base_ref)
        if achieved is None:
            return AimResult(None, "n/a", required)
        ref = f" vs 1.15 {vs_scenario}" if vs_scenario else ""
        return AimResult(achieved >= factor, f"{fmt_x(achieved)}{ref}", required)

    return evaluate


def aim_threshold(limit: float, better: str, show: Callable[[float], str]) -> Callable[[Medians, Row], AimResult]:
    """Ours must be >= limit (better='higher') or <= limit (better='lower')."""

    def evaluate(med: Medians, row: Row) -> AimResult:
        ours = med.get(row.scenario, OURS, row.key)
        base = med.get(row.scenario, BASELINE, row.key)
        required = speedup(limit, base, better)  # what 1.15 would need to improve by
        if ours is None:
            return AimResult(None, "n/a", required)
        met = ours >= limit if better == "higher" else ours <= limit
        return AimResult(met, show(ours), required)

    return evaluate


def aim_vs_reference(factor: float, reference: str) -> Callable[[Medians, Row], AimResult]:
    """Ours must reach ``factor`` times the reference scenario (e.g. ProcessPoolExecutor)."""

    def evaluate(med: Medians, row: Row) -> AimResult:
        ours = med.get(row.scenario, OURS, row.key)
        base = med.get(row.scenario, BASELINE, row.key)
        ref = med.get(reference, PPE, row.key)
        required = speedup(factor * ref, base, row.better) if ref is not None else None
        ours_ratio = speedup(ours, ref, row.better)
        base_ratio = speedup(base, ref, row.better)
        detail = f"rs/PPE {fmt_x(ours_ratio)}; 1.15/PPE {fmt_x(base_ratio)}"
        return AimResult(None if ours_ratio is None else ours_ratio >= factor, detail, required)

    return evaluate


def aim_metrics_overhead(limit: float) -> Callable[[Medians, Row], AimResult]:
    """Ours with metrics must reach ``1 - limit`` of ours without (throughput_1step_64)."""

    def evaluate(med: Medians, row: Row) -> AimResult:
        with_metrics = med.get("throughput_1step_64", OURS, row.key)
        without = med.get(row.scenario, OURS, row.key)
        if with_metrics is None or without is None:
            return AimResult(None, "n/a", None)
        overhead = 1 - with_metrics / without
        return AimResult(overhead <= limit, f"metrics cost {overhead:.1%}", None)

    return evaluate


def aim_within_wake_ups(factor: float, wake_ups: int, calibration: str) -> Callable[[Medians, Row], AimResult]:
    """Ours must take at most ``factor`` times ``wake_ups`` cross-process wake-ups, as the
    ``calibration`` scenario measured them on the same host in the same run."""

    def evaluate(med: Medians, row: Row) -> AimResult:
        ours = med.get(row.scenario, OURS, row.key)
        base = med.get(row.scenario, BASELINE, row.key)
        wake = med.get(calibration, OURS, "value")
        if ours is None or wake is None or wake <= 0:
            return AimResult(None, "n/a", None)
        limit = factor * wake_ups * wake
        detail = f"{ours / (wake_ups * wake):.2f}x {wake_ups} wake-ups"
        return AimResult(ours <= limit, detail, speedup(limit, base, "lower"))

    return evaluate


@dataclass(frozen=True)
class Row:
    """One line of the results table: a metric of a scenario."""

    scenario: str
    key: str  # "value" (the scenario's main metric) or a key of its "extra"
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    aim: Aim | None = None
    chart: bool = True  # whether the speed-up goes into the chart


IDEAL_BATCH_RATE = 1600.0
ROWS: list[Row] = [
    Row("host_calibration", "value", "wake-up of a parked process, p50", "us", "lower", chart=False),
    Row("host_calibration", "wake_p99_us", "wake-up, p99", "us", "lower", chart=False),
    Row("host_calibration", "spin_hop_p50_us", "hop between spinning processes, p50", "us", "lower", chart=False),
    Row("host_calibration", "spin_budget_us", "spin budget chosen for a 1-step flow", "us", "lower", chart=False),
    Row("latency_1step", "value", "p50 latency", "us", "lower", Aim("≥10x lower than 1.15", aim_speedup(10))),
    Row(
        "latency_1step",
        "value",
        "p50 latency vs the host's wake-ups",
        "us",
        "lower",
        Aim("≤2x two wake-ups (host_calibration)", aim_within_wake_ups(2.0, 2, "host_calibration")),
        chart=False,
    ),
    Row("latency_1step", "p99_us", "p99 latency", "us", "lower"),
    Row("throughput_1step_64", "value", "throughput", "tasks/s", "higher", Aim("≥10x 1.15", aim_speedup(10))),
    Row(
        "throughput_1step_64_nometrics",
        "value",
        "throughput, metrics off",
        "tasks/s",
        "higher",
        Aim("metrics cost ≤5% (vs throughput_1step_64)", aim_metrics_overhead(0.05)),
        chart=False,
    ),
    Row(
        "throughput_1step_256",
        "value",
        "throughput",
        "tasks/s",
        "higher",
        Aim("≥10x 1.15 at 64 in flight", aim_speedup(10, "throughput_1step_64")),
    ),
    Row("throughput_2step_64", "value", "throughput", "tasks/s", "higher", Aim("≥10x 1.15", aim_speedup(10))),
    Row(
        "throughput_2step_256",
        "value",
        "throughput",
        "tasks/s",
        "higher",
        Aim("≥10x 1.15 at 64 in flight", aim_speedup(10, "throughput_2step_64")),
    ),
    Row("socketflow_latency", "value", "p50 latency", "us", "lower", Aim("≥10x lower than 1.15", aim_speedup(10))),
    Row("socketflow_latency", "p99_us", "p99 latency", "us", "lower"),
    Row("socketflow_throughput_64", "value", "throughput", "tasks/s", "higher", Aim("≥10x 1.15", aim_speedup(10))),
    Row("payload_1mb_2step", "value", "throughput", "tasks/s", "higher"),
    Row("payload_16mb_2step", "value", "throughput", "tasks/s", "higher", Aim("≥20x 1.15", aim_speedup(20))),
    Row("payload_1mb_2step_shared", "value", "throughput", "tasks/s", "higher"),
    Row("payload_16mb_2step_shared", "value", "throughput", "tasks/s", "higher"),
    Row("payload_16mb_2step_work", "value", "throughput", "tasks/s", "higher"),
    Row(
        "payload_16mb_2step_work",
        "efficiency_pct",
        "share of the handlers' ideal",
        "%",
        "higher",
        Aim("≥80% of what the handlers' cost allows", aim_threshold(80.0, "higher", lambda v: f"{v:.1f}% of ideal")),
        chart=False,
    ),
    *[
        Row(
            name,
            "value",
            "throughput",
            "tasks/s",
            "higher",
            Aim(
                "≥95% of ideal 1600 tasks/s",
                aim_threshold(0.95 * IDEAL_BATCH_RATE, "higher", lambda v: f"{v / IDEAL_BATCH_RATE:.1%} of ideal"),
            ),
        )
        for name in ("batching_t0", "batching_t10ms")
    ],
    Row(
        "cpu_2ms_nprocs2",
        "value",
        "throughput",
        "tasks/s",
        "higher",
        Aim("≥1.0x ProcessPoolExecutor(2)", aim_vs_reference(1.0, "ppe_cpu_2ms")),
    ),
    Row("ppe_cpu_2ms", "value", "reference throughput", "tasks/s", "higher", chart=False),
    Row(
        "start_stop",
        "value",
        "graceful stop, idle",
        "ms",
        "lower",
        Aim("< 100 ms", aim_threshold(100.0, "lower", lambda v: f"{v:.1f} ms")),
    ),
    Row("start_stop", "start_ms", "start", "ms", "lower"),
    Row(
        "idle_cpu",
        "value",
        "idle CPU",
        "% of a core",
        "lower",
        Aim("~0% (≤1% of a core)", aim_threshold(1.0, "lower", lambda v: f"{v:.2f}%")),
    ),
    Row(
        "soak_memory",
        "value",
        "RSS growth",
        "MB",
        "lower",
        Aim("no growth (< 3 MB)", aim_threshold(3.0, "lower", lambda v: f"{v:+.1f} MB")),
        chart=False,
    ),
    # The same scenarios with a CPU-bound process beside them: the ratios, no separate aims.
    Row("host_calibration+burner", "value", "wake-up, p50, host busy", "us", "lower", chart=False),
    Row("host_calibration+burner", "spin_budget_us", "spin budget, host busy", "us", "lower", chart=False),
    Row("latency_1step+burner", "value", "p50 latency, CPU hog beside", "us", "lower"),
    Row("latency_1step+burner", "p99_us", "p99 latency, CPU hog beside", "us", "lower", chart=False),
    Row("throughput_1step_64+burner", "value", "throughput, CPU hog beside", "tasks/s", "higher"),
    Row("throughput_2step_64+burner", "value", "throughput, CPU hog beside", "tasks/s", "higher"),
    Row("payload_16mb_2step+burner", "value", "throughput, CPU hog beside", "tasks/s", "higher"),
]


# --------------------------------------------------------------------------------------
# Running scenarios
# --------------------------------------------------------------------------------------


@dataclass
class Interpreter:
    """A Python interpreter to run scenarios with, and whether it is usable."""

    key: str
    path: str
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why it cannot be used

    @property
    def ok(self) -> bool:
        return self.error is None


PROBE = """
import importlib.metadata as md, json, sys
info = {"python": sys.version.split()[0]}
try:
    import aqueduct
    info["aqueduct_module"] = getattr(aqueduct, "__file__", None)
    info["aqueduct_version"] = getattr(aqueduct, "__version__", None)
    for dist in ("aqueduct", "aqueduct-rs"):
        try:
            info["aqueduct_version"] = f"{dist} {md.version(dist)}"
            break
        except md.PackageNotFoundError:
            pass
except Exception as exc:
    info["error"] = f"cannot import aqueduct: {exc!r}"
for extra in ("numpy", "psutil"):
    try:
        __import__(extra)
    except ImportError:
        info.setdefault("error", f"{extra} missing (pip install -r bench/requirements.txt)")
print(json.dumps(info))
"""


def probe_interpreter(key: str, path: str) -> Interpreter:
    interp = Interpreter(key, path)
    if not Path(path).exists():
        interp.error = f"interpreter not found: {path}"
        return interp
    try:
        proc = subprocess.run([path, "-c", PROBE], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
        interp.info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        interp.error = f"probe failed: {exc!r}"
        return interp
    interp.error = interp.info.pop("error", None)
    return interp


def ensure_baseline(path: str) -> str | None:
    """Create the default baseline venv if needed; returns an error message or None."""
    if os.path.abspath(path) != str(DEFAULT_BASELINE):
        return None  # a custom interpreter: the caller is responsible for it
    log(f"ensuring baseline venv ({SETUP_BASELINE.relative_to(ROOT)}) ...")
    try:
        proc = subprocess.run(["bash", str(SETUP_BASELINE)], check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"setup_baseline.sh failed: {exc!r}"
    if proc.returncode != 0:
        return f"setup_baseline.sh failed: {tail(proc.stderr or proc.stdout)}"
    return None


def tail(text: str, limit: int = 300) -> str:
    """The last meaningful line(s) of some output, shortened to ``limit`` characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    # Prefer the last exception line of a traceback.
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:limit]
    return lines[-1][:limit]


def group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the process group ``pgid``.

    Zombies are ignored: orphans are reaped by init, which may take a while.
    """
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: fall back on a signal probe
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Format: "pid (comm) state ppid pgrp ..."; comm may contain spaces or parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_scenario(python: str, scenario: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Run one scenario in a fresh process group; never raises, never hangs.

    Output goes to temporary files rather than pipes, so that a descendant that keeps
    stdout open cannot make us wait after the scenario's main process has exited.
    """
    cmd = [python, str(SCENARIOS_PY), scenario, *(["--quick"] if quick else [])]
    record: dict[str, Any] = {"ok": False, "error": None, "notes": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True
            )
        except OSError as exc:
            record["error"] = f"cannot start: {exc!r}"
            return record
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            returncode = None
        # Descendants left behind get a short grace period, then they are killed.
        deadline = time.monotonic() + STRAGGLER_GRACE_S
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(proc.pid):
            kill_group(proc.pid)
            if returncode is not None:
                record["notes"].append("descendant processes were still alive after exit and were killed")
        record["wall_s"] = round(time.perf_counter() - t0, 2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()

    if returncode is None:
        record["error"] = f"timeout after {timeout:.0f}s (killed)"
        return record
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict) or "value" not in result:
        record["error"] = f"exit code {returncode}: {tail(stderr or stdout)}"
        return record
    if returncode != 0:
        record["notes"].append(f"exit code {returncode} after printing a result")
    record.update(ok=True, value=result["value"], result=result)
    return record


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"FAILED: {record['error']}"
    result = record["result"]
    return f"{result['value']} {result.get('unit', '')} ({record.get('wall_s', '?')} s)"


# --------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------


def metric_of(record: dict[str, Any], key: str) -> float | None:
    if not record.get("ok"):
        return None
    value = record["value"] if key == "value" else record["result"].get("extra", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def rows_for(scenarios: list[str]) -> list[Row]:
    """The table rows of the scenarios that ran (a generic row for those without one)."""
    rows = [row for row in ROWS if row.scenario in scenarios]
    for name in scenarios:
        if not any(row.scenario == name for row in rows):
            rows.append(Row(name, "value", "value", "", "lower"))
    order = {name: i for i, name in enumerate(scenarios)}
    return sorted(rows, key=lambda row: order[row.scenario])


def summarize(runs: list[dict[str, Any]], scenarios: list[str]) -> list[dict[str, Any]]:
    """Medians per (scenario, impl, metric), ratios and aim verdicts, one dict per row."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for record in runs:
        keys = {"value"} | {row.key for row in ROWS if row.scenario == record["scenario"]}
        for key in sorted(keys):
            value = metric_of(record, key)
            if value is not None:
                values.setdefault((record["scenario"], record["impl"], key), []).append(value)
    medians = Medians({key: statistics.median(vals) for key, vals in values.items()})

    summary = []
    for row in rows_for(scenarios):
        # Units and direction reported by the scenario itself win for generic rows.
        unit, better = row.unit, row.better
        sample = next((r for r in runs if r["scenario"] == row.scenario and r.get("ok")), None)
        if sample and row.key == "value" and not unit:
            unit, better = sample["result"].get("unit", ""), sample["result"].get("better", "lower")
        cells = {}
        for impl in (OURS, BASELINE, PPE):
            mine = [r for r in runs if r["scenario"] == row.scenario and r["impl"] == impl]
            if not mine:
                continue
            vals = values.get((row.scenario, impl, row.key), [])
            errors = [r["error"] for r in mine if not r["ok"]]
            cells[impl] = {
                "median": medians.get(row.scenario, impl, row.key),
                "values": vals,
                "runs": len(mine),
                "ok": sum(1 for r in mine if r["ok"]),
                "errors": errors,
            }
        ratio = speedup(medians.get(row.scenario, OURS, row.key), medians.get(row.scenario, BASELINE, row.key), better)
        entry = {
            "scenario": row.scenario,
            "key": row.key,
            "metric": row.metric,
            "unit": unit,
            "better": better,
            "cells": cells,
            "speedup_vs_115": ratio,
            "chart": row.chart,
        }
        if row.aim is not None:
            verdict = row.aim.evaluate(medians, Row(row.scenario, row.key, row.metric, unit, better))
            entry["aim"] = {
                "text": row.aim.text,
                "met": verdict.met,
                "detail": verdict.detail,
                "required_speedup": verdict.required_speedup,
            }
        summary.append(entry)
    return summary


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {
        "nproc": nproc,
        "cpu_model": cpu_model,
        "mem_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}",
        "runner_python": platform.python_version(),
    }


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{' (dirty)' if dirty else ''}" if rev else None


def fmt_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if magnitude >= 0.01 or value == 0 else f"{value:.2e}"


def fmt_cell(cell: dict[str, Any] | None, unavailable: str | None) -> str:
    if cell is None:
        return "—"
    if cell["median"] is None:
        reason = unavailable or (cell["errors"][0] if cell["errors"] else "no value")
        word = "n/a" if unavailable else "failed"
        return f"{word}: {shorten(reason, 60)}"
    text = fmt_value(cell["median"])
    if cell["ok"] < cell["runs"]:
        text += f" ({cell['ok']}/{cell['runs']} ok)"
    return text


def shorten(text: str, limit: int) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def repo_relative(path: str | None) -> str | None:
    """A path inside the repository, relative to its root (the report names no machine paths)."""
    if not path:
        return path
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


#: Everything below this line in docs/benchmarks.md is written by hand (before/after comparisons
#: of a change, runs on other hosts) and kept when the table above is generated again.
HISTORY_MARKER = "<!-- Hand-written below: kept as is when bench/run.py regenerates this file. -->"


def kept_history(target: Path) -> str:
    """The hand-written part of an existing report (from :data:`HISTORY_MARKER` on), or ''."""
    try:
        text = target.read_text()
    except FileNotFoundError:
        return ""
    at = text.find(HISTORY_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def render_markdown(data: dict[str, Any], chart_name: str | None) -> str:
    meta = data["meta"]
    machine = meta["machine"]
    interps = meta["interpreters"]
    unavailable = {key: info.get("error") for key, info in interps.items()}
    lines = [
        "# Benchmarks: aqueduct-rs vs aqueduct 1.15",
        "",
        "<!-- Generated by bench/run.py; do not edit by hand. -->",
        "",
        (
            f"Produced with `make bench` (i.e. `{meta['command']}`) on {meta['date']}"
            f"{', git ' + meta['git'] if meta.get('git') else ''}."
        ),
        (
            f"Mode: {'quick (smoke test, short windows)' if meta['quick'] else 'full'}, "
            f"{meta['runs']} runs per implementation and scenario, medians reported; "
            "each run is a fresh process; implementations interleaved run by run."
        ),
        "",
        (
            f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['mem_gb']} GB RAM, "
            f"{machine['os']}; 1-minute load average before the run: "
            f"{fmt_value(machine.get('loadavg_1min_before'))}."
        ),
        "",
        "| implementation | interpreter | Python | aqueduct |",
        "| --- | --- | --- | --- |",
    ]
    for key, info in interps.items():
        where = repo_relative(info.get("aqueduct_module")) or "—"
        version = info.get("aqueduct_version") or "?"
        status = f"unavailable: {shorten(info['error'], 80)}" if info.get("error") else f"{version} ({where})"
        lines.append(f"| {LABELS[key]} | `{repo_relative(info['path'])}` | {info.get('python', '?')} | {status} |")
    if meta.get("same_module"):
        note = "both columns imported the same aqueduct module: this was a plumbing test, not a comparison."
        lines += ["", f"> **Note:** {note}"]
    lines += [
        "",
        "Speed-up = how many times better aqueduct-rs is than 1.15 (throughput: rs/1.15; times: 1.15/rs).",
        "",
        "| scenario | metric | aqueduct-rs | aqueduct 1.15 | speed-up | aim | status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in data["summary"]:
        cells = entry["cells"]
        unit = f" ({entry['unit']})" if entry["unit"] else ""
        if PPE in cells:  # the reference row has a single value
            ours_cell = f"{LABELS[PPE]}: {fmt_cell(cells[PPE], unavailable.get(PPE))}"
            base_cell = "—"
        else:
            ours_cell = fmt_cell(cells.get(OURS), unavailable.get(OURS))
            base_cell = fmt_cell(cells.get(BASELINE), unavailable.get(BASELINE))
        aim = entry.get("aim")
        if aim is None:
            aim_text, status = "—", ""
        else:
            verdict = {True: "met", False: "**not met**", None: "n/a"}[aim["met"]]
            aim_text = aim["text"]
            status = verdict if aim["detail"] == "n/a" else f"{verdict}: {aim['detail']}"
        ratio = fmt_x(entry["speedup_vs_115"]) if entry["speedup_vs_115"] is not None else "—"
        lines.append(
            f"| `{entry['scenario']}` | {entry['metric']}{unit} | {ours_cell} | {base_cell} | {ratio} | "
            f"{aim_text} | {status} |"
        )
    if chart_name:
        lines += [
            "",
            f"![speed-up versus aqueduct 1.15]({chart_name})",
            "",
            "Bars: speed-up of aqueduct-rs versus 1.15 (log scale); black ticks: the speed-up each aim implies.",
        ]
    lines += ["", "## Scenarios", ""]
    for name in dict.fromkeys(entry["scenario"] for entry in data["summary"]):
        spec = SPEC_BY_NAME.get(name)
        lines.append(f"- `{name}`: {spec.description if spec else ''}")
    extras = secondary_notes(data)
    if extras:
        lines += ["", "## Details (medians)", "", *extras]
    skipped = {r["impl"] for r in data["runs"] if "not run" in r.get("notes", [])}
    if skipped:
        lines += [""]
        lines += [f"- {LABELS[impl]} was not run: {unavailable.get(impl)}" for impl in sorted(skipped)]
    failures = [r for r in data["runs"] if not r["ok"] and "not run" not in r.get("notes", [])]
    if failures:
        lines += ["", "## Failed runs", "", "| scenario | implementation | run | reason |", "| --- | --- | --- | --- |"]
        for record in failures:
            lines.append(
                f"| `{record['scenario']}` | {LABELS[record['impl']]} | {record['run']} | "
                f"{shorten(record['error'] or '', 200)} |"
            )
    http = ROOT / "bench" / "results" / "http.json"
    if http.exists():
        import http_compare  # bench/, next to this file

        lines += ["", *http_compare.render(json.loads(http.read_text()))]
    lines += [
        "",
        "## Reproducing",
        "",
        "`make bench` (full run) or `python bench/run.py --quick` (smoke test); see `bench/README.md`.",
        "`make bench-http` measures the HTTP section alone (`bench/http_compare.py`).",
        "Raw per-run results are written to `bench/results/latest.json` (not committed).",
        "",
    ]
    return "\n".join(lines)


def secondary_notes(data: dict[str, Any]) -> list[str]:
    """A few secondary numbers worth showing (batch sizes, RSS, failures ...)."""
    notes = []
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in data["runs"]:
        if record["ok"]:
            by_key.setdefault((record["scenario"], record["impl"]), []).append(record["result"].get("extra", {}))

    def med(scenario: str, impl: str, key: str) -> float | None:
        vals = [e[key] for e in by_key.get((scenario, impl), []) if isinstance(e.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    def both(scenario: str, key: str, label: str, unit: str = "") -> None:
        ours, base = med(scenario, OURS, key), med(scenario, BASELINE, key)
        if ours is not None or base is not None:
            ours_text, base_text = (fmt_value(v) + (unit if v is not None else "") for v in (ours, base))
            notes.append(f"- `{scenario}` {label}: aqueduct-rs {ours_text}, 1.15 {base_text}")

    for name in ("batching_t0", "batching_t10ms"):
        both(name, "mean_batch_size", "mean batch size")
    for name in ("payload_16mb_2step", "payload_16mb_2step_shared"):
        both(name, "mb_per_s", "payload bandwidth", " MB/s")
    both("payload_16mb_2step_work", "handler_ms", "handler cost, timed alone", " ms")
    both("payload_16mb_2step_work", "ideal_rate", "ideal (slowest step's handler)", " tasks/s")
    both("soak_memory", "start_mb", "RSS at start", " MB")
    both("soak_memory", "end_mb", "RSS at end", " MB")
    both("soak_memory", "growth_main_mb", "RSS growth of the main process alone", " MB")
    both("soak_memory", "growth_second_half_mb", "RSS growth over the second half of the soak", " MB")
    both("soak_memory", "growth_per_10k_tasks_mb", "RSS growth per 10k tasks", " MB")
    both("soak_memory", "completed", "tasks in the soak", "")
    both("cpu_2ms_nprocs2", "flow_stop_ms", "graceful stop with nprocs=2", " ms")
    failed_calls = {}
    for (scenario, impl), extras in by_key.items():
        count = sum(e.get("failures", 0) or 0 for e in extras)
        if count:
            failed_calls[(scenario, impl)] = count
    for (scenario, impl), count in sorted(failed_calls.items()):
        notes.append(f"- `{scenario}` {LABELS[impl]}: {count} failed `process()` calls over all runs")
    return notes


LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0}


def render_chart(data: dict[str, Any], path: Path) -> str | None:
    """Bar chart of speed-ups (log scale) with aim markers; returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib unavailable ({exc}); chart skipped"

    entries = [e for e in data["summary"] if e["chart"]]
    if not entries:
        return "nothing to chart"
    labels = [f"{e['scenario']} · {e['metric']}" for e in entries]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(entries) + 1.6))
    positions = list(range(len(entries)))[::-1]
    for y, entry in zip(positions, entries, strict=True):
        ratio = entry["speedup_vs_115"]
        aim = entry.get("aim")
        color = "#9e9e9e"
        if aim and aim["met"] is True:
            color = "#2e7d32"
        elif aim and aim["met"] is False:
            color = "#c62828"
        if ratio is None:
            ax.text(1.0, y, "  n/a", va="center", fontsize=8)
        else:
            # Bars grow from 1x: to the right when faster than 1.15, to the left when slower.
            ax.barh(y, ratio - 1.0, left=1.0, color=color, height=0.6)
            if ratio >= 1.0:
                ax.text(ratio * 1.08, y, fmt_x(ratio), va="center", ha="left", fontsize=8, bbox=LABEL_BOX, zorder=4)
            else:
                ax.text(ratio / 1.08, y, fmt_x(ratio), va="center", ha="right", fontsize=8, bbox=LABEL_BOX, zorder=4)
        if aim and aim.get("required_speedup"):
            # A tick across the bar, so that it stays visible behind a value label.
            ax.plot(aim["required_speedup"], y, marker="|", color="black", markersize=16, mew=2.5, zorder=3)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("speed-up of aqueduct-rs versus aqueduct 1.15 (log scale, >1 is better)")
    ax.set_title(f"aqueduct-rs vs 1.15 ({data['meta']['date'][:10]}); black tick = aim", fontsize=10)
    ratios = [e["speedup_vs_115"] for e in entries if e["speedup_vs_115"]]
    marks = [e["aim"]["required_speedup"] for e in entries if e.get("aim") and e["aim"].get("required_speedup")]
    low = min([0.5, *ratios, *marks])
    high = max([20.0, *ratios, *marks])
    ax.set_xlim(low / 2, high * 3)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(data: dict[str, Any], docs_dir: Path) -> None:
    docs_dir.mkdir(parents=True, exist_ok=True)
    chart = docs_dir / "benchmarks.png"
    problem = render_chart(data, chart)
    if problem:
        log(problem)
    target = docs_dir / "benchmarks.md"
    target.write_text(render_markdown(data, None if problem else chart.name) + kept_history(target))
    log(f"wrote {docs_dir / 'benchmarks.md'}" + ("" if problem else f" and {chart}"))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark aqueduct-rs against aqueduct 1.15.")
    parser.add_argument("--quick", action="store_true", help="short measurement windows (smoke test)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario and implementation (default 3)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--ours", default=str(DEFAULT_OURS), help="Python of aqueduct-rs (default .venv/bin/python)")
    parser.add_argument("--baseline", default=str(DEFAULT_BASELINE), help="Python with aqueduct 1.15")
    parser.add_argument("--timeout", type=float, help="override the per-run hard timeout, seconds")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results JSON to write")
    parser.add_argument("--docs-dir", type=Path, default=DEFAULT_DOCS, help="where benchmarks.md/.png go")
    parser.add_argument("--report-only", action="store_true", help="only re-render the docs from --results")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    # Absolute, but not resolved: a venv's python is a symlink that must stay as it is.
    args.ours, args.baseline = os.path.abspath(args.ours), os.path.abspath(args.baseline)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        data = json.loads(args.results.read_text())
        # Recompute the summary so that changes to ROWS / aims apply to old results too.
        data["summary"] = summarize(data["runs"], data["meta"]["scenarios"])
        write_reports(data, args.docs_dir)
        return 0

    scenarios = [name.strip() for name in args.only.split(",") if name.strip()] or DEFAULT_SCENARIOS
    unknown = [name for name in scenarios if name not in SPEC_BY_NAME]
    if unknown:
        log(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SPEC_BY_NAME)}")
        return 2

    started = time.perf_counter()
    # Other work on the machine skews the numbers: keep a trace of how busy it was.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    baseline_error = ensure_baseline(args.baseline)
    interps = {OURS: probe_interpreter(OURS, args.ours), BASELINE: probe_interpreter(BASELINE, args.baseline)}
    if baseline_error:
        interps[BASELINE].error = baseline_error
    # ProcessPoolExecutor reference: our interpreter (it is plain CPython either way),
    # falling back to the baseline's when ours cannot run scenarios yet.
    ppe_source = interps[OURS] if interps[OURS].ok else interps[BASELINE]
    interps[PPE] = Interpreter(PPE, ppe_source.path, dict(ppe_source.info), ppe_source.error)
    for interp in interps.values():
        state = f"unavailable ({interp.error})" if interp.error else interp.info.get("aqueduct_module")
        log(f"{LABELS[interp.key]:>20}: {interp.path} -> {state}")

    plan = []
    for name in scenarios:
        spec = SPEC_BY_NAME[name]
        for run in range(1, args.runs + 1):
            # Alternate which implementation goes first, so neither is favoured by drift.
            order = spec.impls if run % 2 else spec.impls[::-1]
            plan += [(spec, impl, run) for impl in order]

    runs: list[dict[str, Any]] = []
    for index, (spec, impl, run) in enumerate(plan, 1):
        interp = interps[impl]
        timeout = args.timeout or (spec.timeout_quick_s if args.quick else spec.timeout_full_s)
        if interp.ok:
            record = run_scenario(interp.path, spec.name, args.quick, timeout)
        else:
            record = {"ok": False, "error": interp.error, "notes": ["not run"]}
        record.update(scenario=spec.name, impl=impl, run=run)
        runs.append(record)
        log(f"[{index}/{len(plan)}] {spec.name:<26} {LABELS[impl]:<20} run {run}/{args.runs}: {describe(record)}")

    info = {key: {"path": i.path, **i.info, "error": i.error} for key, i in interps.items()}
    modules = {info[k].get("aqueduct_module") for k in (OURS, BASELINE)}
    data = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick,
            "runs": args.runs,
            "scenarios": scenarios,
            "machine": {**machine_info(), "loadavg_1min_before": load_before},
            "git": git_revision(),
            "interpreters": info,
            "same_module": len(modules) == 1 and None not in modules,
            "total_wall_s": round(time.perf_counter() - started, 1),
        },
        "summary": summarize(runs, scenarios),
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(data, indent=2))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.results.parent / f"run-{stamp}.json").write_text(json.dumps(data, indent=2))
    log(f"wrote {args.results} (total {data['meta']['total_wall_s']} s)")
    write_reports(data, args.docs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
