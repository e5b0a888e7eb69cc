"""Under CI=true a test that skips for a missing build step fails; a GPU skip stays a skip."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''
import pytest

def test_needs_onnx():
    pytest.skip("model_repository has no ONNX files: run `make export`")

@pytest.mark.skipif(True, reason="needs tensorrt and a CUDA GPU")
def test_needs_gpu():
    pass

def test_plain():
    pass
'''


def _run(tmp_path, ci):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # -p loads the plugin alone: the probe does not need tests/conftest.py's torch imports.
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_skips", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_missing_build_step_fails_on_ci(tmp_path):
    code, out = _run(tmp_path, "true")
    assert code == 1, out
    assert "1 failed, 1 passed, 1 skipped" in out, out
    assert "so this skip means the build broke: model_repository has no ONNX files" in out


def test_missing_build_step_skips_elsewhere(tmp_path):
    for ci in (None, "false"):
        code, out = _run(tmp_path, ci)
        assert code == 0 and "1 passed, 2 skipped" in out, out
