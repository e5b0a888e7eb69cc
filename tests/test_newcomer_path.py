"""The README's path for a new user: the make targets serve the checkpoint asked for
without writing into files tracked by git."""

from __future__ import annotations

import json
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


def test_benchmarks_write_user_results_to_an_ignored_place(tmp_path, monkeypatch, capsys):
    """A user's `bench.*` run appends to runs/bench/ (ignored by git); only --record (make
    bench-record) appends to the committed bench/results/."""
    import pytest

    from bench import caption_throughput, output

    repo = ROOT / "model_repository"
    if not (repo / "caption_step" / "1" / "model.onnx").is_file():
        pytest.skip("model_repository has no ONNX files: run `make export`")
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", str(output.USER_RESULTS / "x.jsonl")],
                          cwd=ROOT).returncode == 0
    assert output.results_file("x.jsonl", record=True) == ROOT / "bench" / "results" / "x.jsonl"
    user, reference = tmp_path / "user", tmp_path / "reference"
    monkeypatch.setattr(output, "USER_RESULTS", user)
    monkeypatch.setattr(output, "REFERENCE_RESULTS", reference)
    args = ["--repository", str(repo), "--images", "2", "--batch", "2", "--rounds", "1", "--threads", "1",
            "--beam-size", "1,2", "--checked", "off,on"]
    assert caption_throughput.main(args) == 0
    rows = [json.loads(r) for r in (user / "caption_throughput.jsonl").read_text().splitlines()]
    # one row per beam size and check
    assert [(r["beam_size"], r["checked"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert not reference.exists()
    assert rows[0]["batched_over_beam_1"] == 1.0 and rows[2]["batched_over_beam_1"] > 0
    assert rows[0]["batched_over_unchecked"] == 1.0 and rows[1]["batched_over_unchecked"] > 0
    assert caption_throughput.main([*args, "--record"]) == 0
    assert (reference / "caption_throughput.jsonl").is_file()


def test_export_latency_with_a_missing_checkpoint_is_one_clear_line(tmp_path):
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "bench.export_latency", "--checkpoint",
                          str(tmp_path / "nope.pt")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "nope.pt does not exist" in out.stderr, out.stderr


def test_local_tritonserver_ports_leave_the_gateway_its_port():
    """`make serve` and `export.local_triton serve` run side by side: the gateway keeps 8000
    and finds Triton's gRPC where its default GLIPV2_TRITON_URL points."""
    from export.local_triton import build_parser
    from service.settings import Settings

    args = build_parser().parse_args(["serve"])
    settings = Settings()
    assert settings.port not in (args.http_port, args.grpc_port, args.metrics_port)
    assert settings.triton_url == f"localhost:{args.grpc_port}"


def test_docs_cite_only_files_in_the_repository():
    """Every file a README or docs page links to or names as *.md exists in the repository."""
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "model_repository" / "README.md"]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text) + re.findall(r"\b([\w./-]+\.md)\b", text):
            if "://" in target:
                continue
            found = (page.parent / target).exists() or (ROOT / target).exists()
            assert found, f"{page.relative_to(ROOT)} cites {target}, which is not in the repository"


def test_docs_commands_use_the_projects_venv():
    """A command block's `python -m ...` outside the venv fails ("No module named 'tqdm'"):
    the README's commands name .venv/bin/python (the TensorRT container's python3 aside)."""
    import re

    for page in (ROOT / "README.md", ROOT / "model_repository" / "README.md"):
        for block in re.findall(r"```\w*\n(.*?)```", page.read_text(), re.S):
            if "docker run" in block:  # runs inside NVIDIA's container, whose python3 is right
                continue
            for line in block.splitlines():
                assert not re.match(r"\s*python3? -m", line), f"{page.name}: {line.strip()}"
