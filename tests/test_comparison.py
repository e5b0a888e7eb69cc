"""Candidate comparison (glipv2.modeling.comparison): hand-built cases with known answers,
its invariances, and that it leaves a model started without it unchanged."""

import pytest
import torch

from glipv2.checkpoint import init_weights
from glipv2.modeling import box_ops
from glipv2.modeling.comparison import _GAIN, CandidateComparison
from glipv2.modeling.glipv2 import build_model
from tests.test_checkpoint import _write
from tests.test_model import _inputs

HW = (100, 100)


def _module(text_dim: int = 4) -> CandidateComparison:
    torch.manual_seed(0)
    return CandidateComparison(text_dim, attention_dim=4).requires_grad_(False)


def _set_weight(module: CandidateComparison, value: float) -> None:
    """Every token's weight on size relative to its reference ("large" > 0, "small" < 0)."""
    with torch.no_grad():
        module.weight.bias[0] = value


def _attend_to_token_zero(module: CandidateComparison) -> None:
    """Every token attends (almost) only to token 0; text features are the one-hot vectors
    e0, e1 (see _text)."""
    with torch.no_grad():
        for lin in (module.query, module.key):
            lin.weight.zero_()
            lin.bias.zero_()
        module.query.bias[:] = 10.0
        module.key.weight[:, 0] = 10.0  # only e0 has a key


def _text(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.eye(4)[:2].expand(batch, -1, -1)
    return text, torch.ones(batch, 2, dtype=torch.long)


def _sizes(boxes: torch.Tensor) -> torch.Tensor:
    return box_ops.box_geometry(boxes, HW)[..., 4] * _GAIN


# Three anchors: two candidate objects (token 0 picks both, equally; token 1 neither) and
# background that neither picks.
BOXES = torch.tensor([[[10.0, 10.0, 20.0, 20.0], [60.0, 40.0, 90.0, 70.0], [0.0, 0.0, 5.0, 5.0]]])
LOGITS = torch.tensor([[[5.0, -20.0], [5.0, -20.0], [-30.0, -20.0]]])
CTR = torch.zeros(1, 3)
CANDIDATES_MEAN = (_sizes(BOXES)[0, 0] + _sizes(BOXES)[0, 1]) / 2


@pytest.fixture()
def small_cfg(small_cfg):
    return small_cfg.replace(grounding_comparison=True)  # an option, off in the presets


def test_fresh_module_adds_nothing(small_cfg, tokenizer):
    """Zero-initialised output weights: a model started from weights trained without the
    comparison grounds exactly as they did."""
    torch.manual_seed(0)
    with_it = build_model(small_cfg).eval()
    without = build_model(small_cfg.replace(grounding_comparison=False)).eval()
    without.load_state_dict({k: v for k, v in with_it.state_dict().items() if "candidate_comparison" not in k})
    images, ids, mask = _inputs(tokenizer, ["large star. the red circle left of the blue cross."], small_cfg.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(with_it(images, ids, mask).logits, without(images, ids, mask).logits)


def test_init_from_weights_without_the_comparison(tmp_path, small_cfg, tokenizer):
    """--init-from a checkpoint trained without the comparison (the demo's first stage):
    the comparison starts fresh and the model grounds as that checkpoint did."""
    torch.manual_seed(0)
    before_cfg = small_cfg.replace(grounding_comparison=False)
    before = build_model(before_cfg).eval()
    path = tmp_path / "stage1.pt"
    _write(path, before, before_cfg)
    torch.manual_seed(1)
    after = build_model(small_cfg).eval()
    init_weights(after, small_cfg, path)
    images, ids, mask = _inputs(tokenizer, ["small red star. the star above the cross."], small_cfg.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(after(images, ids, mask).logits, before(images, ids, mask).logits)


def test_larger_candidate_gains_by_its_size_relative_to_the_candidates():
    """'large star': a positive weight on size relative to the mean of the candidates "star"
    picks lifts the larger one and lowers the smaller one by hand-computed amounts."""
    m = _module()
    _attend_to_token_zero(m)
    _set_weight(m, 1.0)
    text, mask = _text()
    out = m(LOGITS, CTR, BOXES, HW, text, mask)
    torch.testing.assert_close(out[0, :, 0], _sizes(BOXES)[0] - CANDIDATES_MEAN, atol=1e-4, rtol=0)
    assert out[0, 1, 0] > 0 > out[0, 0, 0]


def test_token_reads_the_reference_another_token_picks():
    """'small' picks nothing itself but attends to token 0 ("star"), whose candidates are the
    two objects; a negative weight on size relative to them favours the smaller."""
    m = _module()
    _attend_to_token_zero(m)
    _set_weight(m, -1.0)
    text, mask = _text()
    out = m(LOGITS, CTR, BOXES, HW, text, mask)
    torch.testing.assert_close(out[0, :, 1], -(_sizes(BOXES)[0] - CANDIDATES_MEAN), atol=1e-4, rtol=0)
    assert out[0, 0, 1] > 0 > out[0, 1, 1]


def test_background_anchors_do_not_move_the_reference():
    """A thousand faint background anchors (score 0.007 each, boxes as large as the image)
    beside the two candidates: the reference stays the candidates' mean size, so the larger
    candidate still gains and the smaller still loses. (Weighted by the plain scores, the
    background would outweigh the candidates seven to one.)"""
    m = _module()
    _attend_to_token_zero(m)
    _set_weight(m, 1.0)
    n = 1000
    boxes = torch.cat([BOXES[:, :2], torch.tensor([0.0, 0.0, 100.0, 100.0]).expand(1, n, 4)], dim=1)
    logits = torch.cat([LOGITS[:, :2], torch.tensor([-5.0, -20.0]).expand(1, n, 2)], dim=1)
    text, mask = _text()
    out = m(logits, torch.zeros(1, n + 2), boxes, HW, text, mask)
    # within 0.025 of the image side in sqrt area (the candidates differ by 0.2)
    torch.testing.assert_close(out[0, :2, 0], _sizes(BOXES)[0, :2] - CANDIDATES_MEAN, atol=0.025 * _GAIN, rtol=0)
    assert out[0, 1, 0] > 0 > out[0, 0, 0]


def test_comparison_reads_sizes_not_positions():
    """Moving every box by the same offset (inside the image) changes nothing: "large" is
    about size among the candidates, never where they are on the canvas."""
    m = _module()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 1.0)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 3, generator=g) * 3
    xy = torch.rand(2, 6, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 10 + torch.rand(2, 6, 2, generator=g) * 20], dim=-1)
    text, mask = torch.randn(2, 3, 4, generator=g), torch.ones(2, 3, dtype=torch.long)
    moved = boxes + torch.tensor([15.0, 25.0, 15.0, 25.0])
    base = m(logits, torch.zeros(2, 6), boxes, HW, text, mask)
    assert base.abs().max() > 0.1  # the comparison is not idle here
    torch.testing.assert_close(m(logits, torch.zeros(2, 6), moved, HW, text, mask), base, atol=1e-4, rtol=0)


def test_padding_tokens_change_nothing(small_cfg, tokenizer):
    """With trained-looking (non-zero) weights, a prompt padded in a batch scores as alone:
    padded tokens are never attended to."""
    torch.manual_seed(0)
    model = build_model(small_cfg).eval()
    images, ids, mask = _inputs(tokenizer, ["large star. the red circle left of the blue cross.", "cross"],
                                small_cfg.image_hw)
    n = int(mask[1].sum())
    with torch.no_grad():
        plain = model(images, ids, mask).logits  # the fresh comparison adds nothing
        for p in model.head.candidate_comparison.parameters():
            p.normal_(0, 0.5)
        batched = model(images, ids, mask)
        single = model(images[1:], ids[1:, :n], mask[1:, :n])
    assert (batched.logits - plain).abs().max() > 1.0  # the comparison reaches the logits
    torch.testing.assert_close(batched.logits[1, :, :n], single.logits[0], atol=1e-4, rtol=1e-4)


def test_vqa_pass_leaves_the_comparison_out(small_cfg, tokenizer):
    """The VQA head reads the question's detector pass without the comparison (its extremes
    compare the candidates themselves): answers do not change with the comparison's weights,
    while grounding logits do."""
    torch.manual_seed(0)
    model = build_model(small_cfg.replace(vqa_answers=("yes", "no", "red", "2"))).eval()
    images, ids, mask = _inputs(tokenizer, ["what shape is left of the red circle?"], small_cfg.image_hw)
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        answers, logits = model.vqa(images, text, mask), model(images, ids, mask).logits
        for p in model.head.candidate_comparison.parameters():
            p.normal_(0, 0.5)
        torch.testing.assert_close(model.vqa(images, text, mask), answers)
        assert (model(images, ids, mask).logits - logits).abs().max() > 1.0
