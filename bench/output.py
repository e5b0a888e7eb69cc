"""Where a benchmark writes its figures. What a user measures goes to runs/bench/ (ignored
by git), so running a benchmark never changes a tracked file; the committed reference
figures in bench/results/ are written only on purpose, with --record (`make bench-record`)."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_RESULTS = ROOT / "runs" / "bench"
REFERENCE_RESULTS = ROOT / "bench" / "results"


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true",
                        help="append to the committed reference results (bench/results/) instead of runs/bench/")


def results_file(name: str, record: bool) -> Path:
    """The file a benchmark appends its record to (name: e.g. 'export_latency.jsonl')."""
    return (REFERENCE_RESULTS if record else USER_RESULTS) / name
