"""What the two schemathesis suites (test_service_schema, test_service_fuzz) share: running
one operation's generated cases."""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis.errors import Unsatisfiable


def run_operation(run: Callable[[], None], method: str, path: str, mode) -> None:
    """Runs `run` (a hypothesis test over one operation's cases in generation `mode`) and
    prints how long it took. An operation without inputs (GET /health/live) has no negative
    cases: that run is skipped, not failed."""
    from schemathesis.generation import GenerationMode

    started = time.perf_counter()
    try:
        run()
    except Unsatisfiable:
        if mode != GenerationMode.NEGATIVE:
            raise
        pytest.skip(f"{method} {path}: no negative data (the operation has no inputs)")
    print(f"\n{method} {path} [{mode}]: {time.perf_counter() - started:.2f}s")
