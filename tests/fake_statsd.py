"""A StatsD buffer for the metrics tests, and an exporter that tells it when a round ends."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aqueduct.metrics import ToStatsDMetricsExporter


class FakeStatsD:
    """Remembers every call, in order, and counts the exporter's rounds."""

    def __init__(self):
        self.calls = defaultdict(list)
        self.lines: list = []
        self.rounds = 0
        self._round_done = asyncio.Event()

    def exporter(self, **kwargs) -> ToStatsDMetricsExporter:
        return RoundsExporter(self, **kwargs)

    def count(self, name, value):
        self.calls[('count', name)].append(value)
        self.lines.append(('count', name, value))

    def timing(self, name, value):
        self.calls[('timing', name)].append(value)
        self.lines.append(('timing', name, value))

    def gauge(self, name, value):
        self.calls[('gauge', name)].append(value)
        self.lines.append(('gauge', name, value))

    def round_done(self) -> None:
        self.rounds += 1
        self._round_done.set()

    async def exported(self, rounds: int = 2) -> None:
        """Returns after ``rounds`` more export rounds (two by default: everything recorded
        before the call, while a round may have been under way, has been exported)."""
        target = self.rounds + rounds
        async with asyncio.timeout(10):
            while self.rounds < target:
                self._round_done.clear()
                await self._round_done.wait()

    def names(self, kind):
        return {name for k, name in self.calls if k == kind}

    def sent(self, name: str) -> int:
        """How many lines named ``name`` were sent, of any kind."""
        return sum(1 for _, n, _ in self.lines if n == name)


class RoundsExporter(ToStatsDMetricsExporter):
    def export(self, metrics) -> None:
        super().export(metrics)
        self.target.round_done()
