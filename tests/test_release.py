"""training.release: a slim serving checkpoint, with serving-only settings changeable."""

import pytest
import torch

from glipv2.checkpoint import CheckpointError, load_model
from glipv2.modeling.glipv2 import build_model
from glipv2.predict import TorchPredictor
from tests.test_checkpoint import _write
from training.release import main, release


@pytest.fixture()
def checkpoint(tmp_path, small_cfg):
    torch.manual_seed(0)
    cfg = small_cfg.replace(token_aggregation="mean")
    model = build_model(cfg)
    path = tmp_path / "best.pt"
    _write(path, model, cfg, optimizer={"state": {}}, step=7)
    return path


def test_release_keeps_weights_and_sets_serving_fields(tmp_path, checkpoint):
    out = tmp_path / "tiny.pt"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--serving", "token_aggregation=geometric"]) == 0
    slim = torch.load(out, weights_only=False)
    assert "optimizer" not in slim and slim["step"] == 7
    model = load_model(out)[0]
    assert model.cfg.token_aggregation == "geometric"
    # The predictor scores detections the way the released config says.
    assert TorchPredictor(model).postprocess.token_aggregation == "geometric"
    before = torch.load(checkpoint, weights_only=False)["model"]
    assert all(torch.equal(before[k], v) for k, v in slim["model"].items())


def test_release_refuses_settings_the_weights_depend_on(tmp_path, checkpoint, capsys):
    with pytest.raises(CheckpointError, match="only threshold_on, token_aggregation"):
        release(str(checkpoint), str(tmp_path / "x.pt"), {"image_hw": "[64, 64]"})
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.pt"),
                 "--serving", "token_aggregation=median"]) == 2
    assert "token_aggregation" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_release_refuses_a_serving_flag_without_a_value(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.pt"), "--serving", "token_aggregation"])
    assert e.value.code == 2 and "--serving expects FIELD=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_release_sets_caption_words_and_refuses_a_bare_word(tmp_path, checkpoint, capsys):
    """caption_words (decoding only) is a serving field; one word instead of a list is an
    error, not a list of its letters."""
    out = tmp_path / "tiny.pt"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--serving", 'caption_words=["a","red"]']) == 0
    assert load_model(out)[0].cfg.caption_words == ("a", "red")
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "y.pt"),
                 "--serving", "caption_words=red"]) == 2
    assert "caption_words: must be a list of words" in capsys.readouterr().err
    assert not (tmp_path / "y.pt").exists()


def test_release_sets_the_checked_caption_phrases(tmp_path, checkpoint, capsys):
    """caption_checked_phrases / caption_check_threshold (decoding only) are serving fields;
    a phrase with punctuation (captions spell it as a word of its own) is refused."""
    out = tmp_path / "tiny.pt"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--serving",
                 'caption_checked_phrases=["red circle","star"]', "--serving", "caption_check_threshold=0.3"]) == 0
    cfg = load_model(out)[0].cfg
    assert cfg.caption_checked_phrases == ("red circle", "star") and cfg.caption_check_threshold == 0.3
    for bad, why in (('caption_checked_phrases=["red-circle"]', "caption_checked_phrases"),
                     ('caption_checked_phrases=["Red circle"]', "caption_checked_phrases"),
                     ("caption_check_threshold=1", "caption_check_threshold")):
        assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "y.pt"), "--serving", bad]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "y.pt").exists()
