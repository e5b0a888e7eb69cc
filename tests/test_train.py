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

from training.train import RunFinished, TrainConfig, config_from_args, lr_factor, main, train, training_samples

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


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


LOSSES = ("total", "grounding", "box_giou", "centerness", "contrastive")


def test_resume_continues_from_the_saved_step(tmp_path):
    """A resumed run starts at its checkpoint's step with the weights, optimizer, schedule,
    data position and global RNG of the run that stopped, so its steps reproduce those of a
    run that never stopped, loss for loss. The text encoder is left unfrozen so that its
    dropout draws from the global RNG (the frozen tiny model draws nothing from it)."""
    args = [*SMALL, "--save-every", "2", "--model", "image_hw=[64,64]", "--batch-size", "2",
            "--model", "freeze_text=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config_from_args([*args, "--out-dir", str(straight), "--max-steps", "4"]))
    train(config_from_args([*args, "--out-dir", str(resumed), "--max-steps", "2"]))
    before = (resumed / "metrics.jsonl").read_text()
    train(config_from_args([*args, "--out-dir", str(resumed), "--max-steps", "4"]))
    after = (resumed / "metrics.jsonl").read_text()
    # The second run did steps 3 and 4 only: a run that started over would log 1 and 2 again.
    assert after.startswith(before)
    second = [json.loads(line) for line in after[len(before):].splitlines()]
    assert [r["step"] for r in second] == [3, 4]
    expected = _records(straight)[2:]
    for got, want in zip(second, expected):
        for k in LOSSES:
            assert got[k] == want[k], (got["step"], k, got[k], want[k])
        assert got["lr"] == want["lr"]
    a = torch.load(straight / "checkpoints" / "step_00000004.pt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "step_00000004.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the dropout stream went on, not over


def test_sigkill_and_resume_reaches_the_same_weights(tmp_path):
    steps = 8
    straight = tmp_path / "straight"
    subprocess.run(_run(straight, steps, 2), cwd=REPO, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_run(killed, steps, 2), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    first = killed / "checkpoints" / "step_00000002.pt"
    deadline = time.monotonic() + 600
    while not first.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first run exited with {proc.returncode} before its first checkpoint:\n"
                        + (tmp_path / "first.log").read_text()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the first run wrote no checkpoint within 600 s")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill"
    saved = sorted(int(p.stem[5:]) for p in (killed / "checkpoints").glob("step_*.pt"))
    assert saved and saved[-1] < steps, saved
    stopped_at = saved[-1]
    logged = _records(killed)  # up to the kill, possibly past the last checkpoint
    assert [r["step"] for r in logged][:stopped_at] == list(range(1, stopped_at + 1))

    second = subprocess.run(_run(killed, steps, 2), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"from {killed / 'checkpoints' / f'step_{stopped_at:08d}.pt'} (step {stopped_at} of {steps})" in second.stderr
    records = _records(killed)
    # The second run started after the last checkpoint: the steps up to it are logged once,
    # by the first run; a run that started over would have logged them a second time.
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[:stopped_at] == logged[:stopped_at]
    for got, want in zip(records, _records(straight)):
        assert all(got[k] == want[k] for k in LOSSES), (got, want)

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
    # a time budget half used is half way down the cosine, whatever the step
    assert lr_factor(10, cfg, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_factor(80, cfg, time_fraction=0.5) == lr_factor(80, cfg)  # steps further along win
    assert lr_factor(20, cfg, time_fraction=1.5) == pytest.approx(0.1)


def test_time_budget_ends_the_run_annealed(tmp_path):
    """A run whose time budget is spent ends there (step count not reached), its last
    step saved with the seconds it trained, at the schedule's final learning rate; asked
    to run again it says it is finished."""
    cfg = config_from_args([*SMALL, "--out-dir", str(tmp_path), "--max-steps", "100000", "--save-every", "1000",
                            "--time-budget-min", "0.2", "--warmup-steps", "1"])
    train(cfg)
    records = [r for r in _records(tmp_path) if r["kind"] == "train"]
    last = records[-1]
    assert 1 <= last["step"] < 100000
    assert last["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)
    (ckpt,) = (tmp_path / "checkpoints").glob("step_*.pt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["step"] == last["step"] and 12.0 <= saved["train_seconds"] < 120.0
    with pytest.raises(RunFinished):
        train(cfg)


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["--out-dir", str(tmp_path), "--model", "fusion_heads=3"]) == 2
    assert "fusion_dim" in capsys.readouterr().err
    assert main(["--out-dir", str(tmp_path), "--train-data", "coco:/nonexistent.json:/x"]) == 2
    assert "nonexistent.json" in capsys.readouterr().err
    assert main(["--out-dir", str(tmp_path), "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["--out-dir", str(tmp_path), "--plural-phrases", "1.5"]) == 2
    assert "plural_phrases" in capsys.readouterr().err


def test_plural_phrases_reach_the_training_data():
    """configs/demo*.json set plural_phrases; the run's samples must carry them."""
    def kinds(cfg):
        data = training_samples(cfg, understanding=False)
        return {k for i in range(12) for k in data[i].phrase_kinds}
    assert "plural" in kinds(config_from_args(["--config", str(REPO / "configs/demo.json")]))
    assert "plural" not in kinds(TrainConfig(grounding_fraction=1.0))


def test_relation_phrases_reach_the_training_data():
    def relations(cfg):
        data = training_samples(cfg, understanding=False)
        return sum(k == "relation" for i in range(12) for k in data[i].phrase_kinds)
    assert relations(TrainConfig(grounding_fraction=1.0, relation_phrases=1.0)) >= \
        relations(TrainConfig(grounding_fraction=1.0)) + 12


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
