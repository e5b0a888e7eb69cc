"""What a faster server stack buys the gateway: uvloop, httptools and orjson, side by side.

`python -m bench.gateway_stack` starts one gateway process per stack (embedded backend,
the same repository) and drives them from this process (load generator outside the
servers' GIL), in alternating rounds so machine noise hits every stack alike:
- p50 at concurrency 1 of /v1/detect with a 640x480 and a 4032x3024 JPEG (JSON/base64),
  and the server process's CPU time per request (user + system, all its threads, from
  /proc): on a CPU shared with other work, wall times swing with the load, CPU time much
  less, and the model's share of it is the same for every stack;
- requests/s at concurrency 16 (640x480).
Stacks (names joined with "+"):
- base: what `python -m service` runs (uvicorn, asyncio loop, its h11 protocol with the
  header deadline, the standard json module parsing requests, responses serialised by
  FastAPI through pydantic's Rust core);
- uvloop: uvicorn's loop="uvloop";
- httptools: uvicorn's http="httptools" (C parser; measured here without the gateway's
  header deadline, which is written for h11);
- orjson: request bodies parsed by orjson.loads and responses rendered by ORJSONResponse
  (FastAPI then serialises through a Python dict instead of pydantic's JSON path).
Needs the optional packages (`pip install uvloop httptools orjson`); a stack whose package
is missing is skipped. Figures are printed with the load average and appended to
runs/bench/gateway_stack.jsonl (bench/results/ with --record).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.gateway import Client, free_port, json_body, load, photo_jpeg, start_gateway
from bench.output import add_record_flag, append_records

FEATURES = ("uvloop", "httptools", "orjson")
TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_STACKS = "base,uvloop,httptools,orjson,uvloop+httptools"
STACK_ENV = "GLIPV2_BENCH_STACK"


def _features(stack: str) -> set[str]:
    parts = {p for p in stack.split("+") if p and p != "base"}
    unknown = parts - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown stack feature(s) {sorted(unknown)}; choose among {list(FEATURES)} or base")
    return parts


def serve() -> None:
    """The gateway as `python -m service` runs it, with the stack of $GLIPV2_BENCH_STACK."""
    import uvicorn

    from service.__main__ import configure_logging, uvicorn_config
    from service.app import create_app
    from service.settings import Settings

    features = _features(os.environ.get(STACK_ENV, "base"))
    settings = Settings()
    configure_logging(settings.log_level)
    config = uvicorn_config(settings)
    if "orjson" in features:
        import types

        import orjson
        import starlette.requests
        from fastapi.responses import ORJSONResponse
        from fastapi.routing import APIRoute
        from starlette.routing import request_response

        starlette.requests.json = types.SimpleNamespace(loads=orjson.loads)  # Request.json()
        app = create_app(settings)
        for route in app.routes:
            if isinstance(route, APIRoute):
                route.response_class = ORJSONResponse
                route.app = request_response(route.get_route_handler())
        config.app = app
    if "uvloop" in features:
        config.loop = "uvloop"
    if "httptools" in features:
        config.http = "httptools"
    uvicorn.Server(config).run()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per gateway")
    p.add_argument("--stacks", default=DEFAULT_STACKS, help=f"comma-separated (default {DEFAULT_STACKS})")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=12, help="sequential requests per p50, per round")
    p.add_argument("--seconds", type=float, default=4.0, help="concurrency-16 run per round")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server side
    p.add_argument("--no-save", action="store_true")
    add_record_flag(p)
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return 0

    stacks = []
    for stack in (s.strip() for s in args.stacks.split(",") if s.strip()):
        missing = [f for f in _features(stack) if importlib.util.find_spec(f) is None]
        if missing:
            print(f"skipping {stack}: {', '.join(missing)} not installed")
        else:
            stacks.append(stack)
    small, large = json_body(photo_jpeg(640, 480)), json_body(photo_jpeg(4032, 3024))
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    keys = ("640x480 p50 ms", "640x480 cpu ms", "4032x3024 p50 ms", "4032x3024 cpu ms", "c16 req/s")
    figures: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in stacks}
    try:
        for stack in stacks:
            port = free_port()
            servers[stack] = (_start(args, stack, port), port)
        for _ in range(args.rounds):
            for stack in stacks:
                port = servers[stack][1]
                c = Client(port)
                pid = servers[stack][0].pid
                for name, body, n in (("640x480", small, args.requests),
                                      ("4032x3024", large, max(3, args.requests // 2))):
                    c.post("/v1/detect", body, "application/json")  # warm
                    cpu = cpu_seconds(pid)
                    for _ in range(n):
                        t = time.perf_counter()
                        status, out = c.post("/v1/detect", body, "application/json")
                        assert status == 200, out[:300]
                        figures[stack][f"{name} p50 ms"].append((time.perf_counter() - t) * 1000)
                    figures[stack][f"{name} cpu ms"].append((cpu_seconds(pid) - cpu) / n * 1000)
                rps, _, errors = load(port, 16, args.seconds, small)
                assert not errors, f"{stack}: {errors} errors at concurrency 16"
                figures[stack]["c16 req/s"].append(rps)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)

    load_avg = os.getloadavg()[0]
    row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "threads": args.threads, "rounds": args.rounds, "load_average_1m": round(load_avg, 2),
           "stacks": {s: {k: statistics.median(v) for k, v in f.items()} for s, f in figures.items()}}
    base = row["stacks"].get("base")
    print(f"gateway server stacks, embedded backend, {args.rounds} alternating rounds "
          f"(load average {load_avg:.2f}); ratio to base in brackets (p50: lower is better)")
    print(f"{'stack':<18}" + "".join(f"{k:>19}" for k in keys))
    for stack, f in row["stacks"].items():
        cells = [f"{f[k]:.1f}" + (f" ({f[k] / base[k]:.2f}x)" if base else "") for k in keys]
        print(f"{stack:<18}" + "".join(f"{c:>19}" for c in cells))
    if not args.no_save:
        append_records("gateway_stack.jsonl", [row], args.record)
    return 0


def _start(args: argparse.Namespace, stack: str, port: int) -> subprocess.Popen:
    """start_gateway's environment, but this module's server with the stack set."""
    return start_gateway(args.repository, args.threads, port, {STACK_ENV: stack},
                         command=[sys.executable, "-m", "bench.gateway_stack", "--serve"])


if __name__ == "__main__":
    sys.exit(main())
