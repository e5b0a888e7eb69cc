"""Event-loop lag probe: how late the gateway's event loop runs a timer.

Every answer the gateway gives, a 503 at the door too, waits for the event loop; when
CPU-bound work holds the loop (or the GIL, or the cores) the loop's timers fire late by
as much. A task sleeps `interval_s` over and over and records how much later than asked
it woke up: a histogram in /metrics (glipv2_event_loop_lag_seconds) and the worst lag.
"""

from __future__ import annotations

import asyncio

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class LoopLagProbe:
    def __init__(self, interval_s: float = 0.025) -> None:
        self.interval_s = float(interval_s)
        self.counts = [0] * len(LAG_BUCKETS_S)
        self.n = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._task: asyncio.Task | None = None

    def observe(self, lag_s: float) -> None:
        lag_s = max(lag_s, 0.0)
        self.n += 1
        self.total_s += lag_s
        self.max_s = max(self.max_s, lag_s)
        for i, bound in enumerate(LAG_BUCKETS_S):
            if lag_s <= bound:
                self.counts[i] += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(loop.time() - asked)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def render(self) -> list[str]:
        """Prometheus text lines (a histogram and the worst lag seen)."""
        name = "glipv2_event_loop_lag_seconds"
        out = [f"# HELP {name} How much later than asked the event loop ran a timer.", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b!r}"}} {c}' for b, c in zip(LAG_BUCKETS_S, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total_s:.6f}", f"{name}_count {self.n}",
                "# HELP glipv2_event_loop_lag_max_seconds The worst event-loop lag since start.",
                "# TYPE glipv2_event_loop_lag_max_seconds gauge", f"glipv2_event_loop_lag_max_seconds {self.max_s:.6f}"]
        return out
