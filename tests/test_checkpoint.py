"""Checkpoints: atomic writes, and a clear error for anything that does not fit."""

import os

import pytest
import torch

from glipv2.checkpoint import FORMAT, CheckpointError, atomic_save, load_model, model_state


def _write(path, model, cfg, **extra):
    atomic_save({"format": FORMAT, "model_config": cfg.to_dict(), "model": model_state(model, cfg), **extra}, path)


def test_round_trip_leaves_out_the_packaged_text_encoder(tmp_path, small_model, small_cfg):
    path = tmp_path / "m.pt"
    _write(path, small_model, small_cfg)
    state = torch.load(path, weights_only=False)["model"]
    assert not any(k.startswith("language.") for k in state)
    loaded, _ = load_model(path)
    for k, v in model_state(small_model, small_cfg).items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a glipv2-serve"):
        load_model(tmp_path / "foreign.pt")


def test_truncated_file_is_corrupt(tmp_path, small_model, small_cfg):
    path = tmp_path / "m.pt"
    _write(path, small_model, small_cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)


def test_other_preset_is_refused(tmp_path, small_model, small_cfg):
    path = tmp_path / "m.pt"
    _write(path, small_model, small_cfg)
    with pytest.raises(CheckpointError, match="is a 'tiny' model, not 'glip-t'"):
        load_model(path, preset="glip-t")


def test_weights_that_do_not_fit_are_named(tmp_path, small_model, small_cfg):
    path = tmp_path / "m.pt"
    state = model_state(small_model, small_cfg)
    state.pop("head.bias0")
    state["head.bbox_pred.weight"] = torch.zeros(3, 3)
    atomic_save({"format": FORMAT, "model_config": small_cfg.to_dict(), "model": state}, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. \['head.bias0'\]\).*head.bbox_pred.weight"):
        load_model(path)


def test_invalid_model_config(tmp_path, small_model, small_cfg):
    path = tmp_path / "m.pt"
    cfg = {**small_cfg.to_dict(), "fusion_heads": 7}
    atomic_save({"format": FORMAT, "model_config": cfg, "model": {}}, path)
    with pytest.raises(CheckpointError, match="invalid model_config.*fusion_dim"):
        load_model(path)
