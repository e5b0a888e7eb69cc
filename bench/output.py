"""Where a benchmark writes its figures. What a user measures goes to runs/bench/ (ignored
by git), so running a benchmark never changes a tracked file; the committed reference
figures in bench/results/ are written only on purpose, with --record (`make bench-record`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
USER_RESULTS = ROOT / "runs" / "bench"
REFERENCE_RESULTS = ROOT / "bench" / "results"


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true",
                        help="append to the committed reference results (bench/results/) instead of runs/bench/")


def results_file(name: str, record: bool) -> Path:
    """The file a benchmark appends its record to (name: e.g. 'export_latency.jsonl')."""
    return (REFERENCE_RESULTS if record else USER_RESULTS) / name


def append_records(name: str, records: Iterable[dict], record: bool) -> Path:
    """Append each record as one JSON line to results_file(name, record) and say where."""
    path = results_file(name, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    print(f"appended to {path}")
    return path
