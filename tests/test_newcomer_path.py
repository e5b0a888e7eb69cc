"""The README's path for a new user: the make targets serve the checkpoint asked for
without writing into files tracked by git."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_n(*args: str) -> str:
    """The commands `make -n` would run (nothing runs; recursive $(MAKE) lines print theirs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "REPOSITORY", "CHECKPOINT")}
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.replace("\\\n", " ").split())


def test_make_serve_serves_the_checkpoint_asked_for():
    mine = "runs/z/checkpoints/step_00000008.pt"
    cmds = _make_n("serve", f"CHECKPOINT={mine}")
    repo = "runs/z/checkpoints/step_00000008-model_repository"
    assert f"export.build --checkpoint {mine} --out {repo} --flavour cpu" in cmds, cmds
    assert "--if-changed" in cmds  # re-exported whenever the manifest's checkpoint hash differs
    assert f"GLIPV2_REPOSITORY={repo} " in cmds, cmds
    default = _make_n("serve")
    assert "export.build --checkpoint demo/tiny.pt --out model_repository --flavour cpu" in default, default
    assert "GLIPV2_REPOSITORY=model_repository " in default


def test_own_checkpoint_repositories_are_ignored_by_git():
    for path in ("runs/z/best-model_repository/manifest.json", "models/mine-model_repository/manifest.json",
                 "models/mine-model_repository-gpu/detector/config.pbtxt"):
        out = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert out.returncode == 0, f"{path} is not ignored"
