"""Training end to end: the loss falls, and a SIGKILLed run resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.train import TrainConfig, config_from_args, lr_factor, main, train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "image_hw=[128,128]", "--workers", "0", "--threads", "2", "--batch-size", "4",
         "--warmup-steps", "5", "--log-every", "1"]


def test_short_run_loss_falls(tmp_path):
    cfg = config_from_args([*SMALL, "--out-dir", str(tmp_path), "--max-steps", "60", "--save-every", "1000",
                            "--lr", "2e-3"])
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in records if r["kind"] == "train"]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "step_00000060.pt").exists()  # the final step is always saved


def _run(out_dir, steps, save_every):
    args = [*SMALL, "--out-dir", str(out_dir), "--max-steps", str(steps), "--save-every", str(save_every)]
    return [sys.executable, "-m", "training.train", *args]


def test_sigkill_and_resume_reaches_the_same_weights(tmp_path):
    steps = 16
    straight = tmp_path / "straight"
    subprocess.run(_run(straight, steps, 4), cwd=REPO, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_run(killed, steps, 4), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "step_00000004.pt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / f"step_{steps:08d}.pt").exists(), "the run finished before the kill"
    subprocess.run(_run(killed, steps, 4), cwd=REPO, check=True, capture_output=True)

    a = torch.load(straight / "checkpoints" / f"step_{steps:08d}.pt", weights_only=False)
    b = torch.load(killed / "checkpoints" / f"step_{steps:08d}.pt", weights_only=False)
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    # only the last keep_last step checkpoints remain
    assert len(list((killed / "checkpoints").glob("step_*.pt"))) <= 3


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["--out-dir", str(tmp_path), "--model", "fusion_heads=3"]) == 2
    assert "fusion_dim" in capsys.readouterr().err
    assert main(["--out-dir", str(tmp_path), "--train-data", "coco:/nonexistent.json:/x"]) == 2
    assert "nonexistent.json" in capsys.readouterr().err
    assert main(["--out-dir", str(tmp_path), "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    args = [*SMALL, "--out-dir", str(tmp_path), "--max-steps", "2", "--save-every", "1"]
    assert main(args) == 0
    assert main([*args, "--model", "fpn_channels=32", "--max-steps", "4"]) == 2
    assert "another model config" in capsys.readouterr().err


def test_torchrun_two_processes_with_accumulation(tmp_path):
    """DDP on gloo: two ranks, gradient accumulation, the contrastive loss gathering the
    other rank's prompts; rank 0 alone writes the log and checkpoints."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [*SMALL, "--out-dir", str(tmp_path), "--max-steps", "3", "--save-every", "3", "--grad-accum", "2",
            "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training.train", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]  # DDP set right for the task mix
    ckpt = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # each rank's RNG is kept
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["contrastive"] > 0 for r in records)


def test_torchrun_multitask(tmp_path):
    """Every task under DDP (gloo, two ranks): the VQA and caption losses run inside the
    wrapped step like the others."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [*SMALL, "--out-dir", str(tmp_path), "--max-steps", "2", "--save-every", "2", "--threads", "1",
            "--loss-vqa", "1", "--loss-caption", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training.train", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["vqa"] > 0 and r["caption"] > 0 for r in records)
    ckpt = torch.load(tmp_path / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert any(k.startswith("caption_decoder.") for k in ckpt["model"])
