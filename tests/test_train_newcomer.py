"""What a user meets when a training command goes wrong: inputs checked before the first
step, a checkpoint that survives a failing evaluation, a finished run that says so,
resuming with other settings refused, Ctrl-C that says how to resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from training.train import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "image_hw=[128,128]", "--workers", "0", "--threads", "2", "--batch-size", "4",
         "--warmup-steps", "1", "--log-every", "1"]


def test_missing_val_dir_fails_before_the_first_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMALL, "--out-dir", str(out), "--max-steps", "2", "--val-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "val directory not found" in err and "training.generate" in err, err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_failing_evaluation_keeps_the_checkpoint_and_a_finished_run_says_so(tmp_path, capsys):
    val = tmp_path / "val"  # passes the up-front check, fails when the evaluation reads it
    (val / "images").mkdir(parents=True)
    (val / "instances.json").write_text("{}")
    (val / "grounding.json").write_text("{}")
    out = tmp_path / "run"
    args = [*SMALL, "--out-dir", str(out), "--max-steps", "2", "--save-every", "100", "--val-dir", str(val)]
    assert main(args) == 2
    assert "instances.json" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_00000002.pt").exists()  # saved before the evaluation ran

    assert main(args) == 0  # nothing left to train: says so instead of printing nothing
    err = capsys.readouterr().err
    assert "is finished: step 2 of 2" in err and "--max-steps" in err and "metrics.jsonl" in err, err


def test_resume_with_other_batch_size_or_lr_needs_a_flag(tmp_path, capsys):
    out = tmp_path / "run"
    base = [*SMALL, "--out-dir", str(out), "--save-every", "1"]
    assert main([*base, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "batch_size: 4 -> 2" in err and "lr: 0.002 -> 0.001" in err and "--allow-changed-config" in err, err
    assert not (out / "checkpoints" / "step_00000002.pt").exists()
    # raising max_steps alone is how a run is trained further: no flag needed
    assert main([*base, "--max-steps", "2"]) == 0
    assert main([*base, "--max-steps", "3", "--batch-size", "2", "--allow-changed-config"]) == 0
    assert (out / "checkpoints" / "step_00000003.pt").exists()


def test_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", *SMALL, "--out-dir", str(out), "--max-steps", "100000",
           "--save-every", "1"]
    # Ctrl-C as a terminal delivers it: a test run started in the background (`make test &`,
    # nohup, some CI runners) ignores SIGINT, and a child inherits that, so the run would
    # never see it. Python turns SIGINT into KeyboardInterrupt only when it starts with the
    # default disposition.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = out / "checkpoints" / "step_00000001.pt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the run wrote no checkpoint"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "interrupted: the newest checkpoint is" in err and "rerun the same command" in err, err[-2000:]
