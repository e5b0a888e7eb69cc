"""GLIPV2_WORKERS: several gateway processes on one port for the triton backend (Triton
batches across them); refused for the embedded backend."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.live_server import wait_until_ok

from tests.test_service import triton_server  # noqa: F401 (fixture: the session's real tritonserver)

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw) -> dict:
    return {**os.environ, "GLIPV2_REPOSITORY": str(REPO), "GLIPV2_LOG_LEVEL": "warning", **kw}


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_embedded_backend_refuses_several_workers():
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(GLIPV2_WORKERS="2", GLIPV2_PORT=str(_free_port())))
    assert proc.returncode == 2, proc.stderr
    assert "GLIPV2_BACKEND=triton" in proc.stderr and "Traceback" not in proc.stderr


def test_triton_backend_serves_from_several_workers(triton_server):  # noqa: F811
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT,
                            env=_env(GLIPV2_WORKERS="2", GLIPV2_BACKEND="triton", GLIPV2_PORT=str(port),
                                     GLIPV2_TRITON_URL=triton_server.url_grpc))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/health/ready", timeout_s=120, alive=lambda: proc.poll() is None, interval_s=0.5)
        assert len(_children(proc.pid)) == 2
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(buf, "PNG")
        body = {"images": [{"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "circle. square."}]}
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/detect", json=body, timeout=60).status_code,
                                  range(16)))
        assert codes == [200] * 16
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
