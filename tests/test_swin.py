"""Tests for the Swin Transformer backbone (glipv2.modeling.swin)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from glipv2.modeling.swin import (  # noqa: E402
    DropPath,
    SwinTransformer,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


def small_model(**kwargs: object) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(**{**SMALL, **kwargs})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def glip_t() -> SwinTransformer:
    """The GLIP-T body: Swin-T (96, 2-2-6-2, 3-6-12-24, window 7), out stages 1..3."""
    torch.manual_seed(0)
    return SwinTransformer()


def expected_size(n: int, stage: int, patch: int = 4) -> int:
    size = math.ceil(n / patch)
    for _ in range(stage):
        size = (size + 1) // 2
    return size


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("hw", [(64, 96), (67, 101)])
def test_output_shapes_strides_channels(hw: tuple[int, int]) -> None:
    # 64x96 -> stride-4 grid 16x24, not a multiple of the 7x7 window;
    # 67x101 is not even a multiple of the patch size.
    h, w = hw
    model = small_model().eval()
    assert model.out_channels == [64, 128, 256]
    assert model.strides == [8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    assert len(outs) == 3
    for out, stage, ch, stride in zip(outs, (1, 2, 3), model.out_channels, model.strides):
        assert out.shape == (2, ch, expected_size(h, stage), expected_size(w, stage))
        assert out.shape[2] == math.ceil(h / stride) and out.shape[3] == math.ceil(w / stride)
        assert torch.isfinite(out).all()


def test_all_stages_and_validation() -> None:
    model = small_model(out_indices=(0, 1, 2, 3)).eval()
    assert model.strides == [4, 8, 16, 32]
    assert model.out_channels == [32, 64, 128, 256]
    assert "norm0.weight" in model.state_dict()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 40, 56))
    shapes = [tuple(o.shape[1:]) for o in outs]
    assert shapes == [(32, 10, 14), (64, 5, 7), (128, 3, 4), (256, 2, 2)]
    with pytest.raises(ValueError):
        SwinTransformer(**SMALL, out_indices=(4,))  # type: ignore[arg-type]


def test_batch_independence() -> None:
    model = small_model().eval()
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    for a, b in zip(full, single):
        torch.testing.assert_close(a[1:2], b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- official key names
# Names taken from microsoft/GLIP maskrcnn_benchmark/modeling/backbone/swint.py
# (SwinTransformer / BasicLayer / SwinTransformerBlock / WindowAttention / Mlp /
# PatchMerging / PatchEmbed), which GLIP-T checkpoints store under "module.backbone.body.".
OFFICIAL_KEYS_AND_SHAPES: dict[str, tuple[int, ...]] = {
    "patch_embed.proj.weight": (96, 3, 4, 4),
    "patch_embed.proj.bias": (96,),
    "patch_embed.norm.weight": (96,),
    "patch_embed.norm.bias": (96,),
    "layers.0.blocks.0.norm1.weight": (96,),
    "layers.0.blocks.1.attn.qkv.weight": (288, 96),
    "layers.0.blocks.1.attn.qkv.bias": (288,),
    "layers.0.blocks.1.attn.proj.bias": (96,),
    "layers.0.blocks.0.attn.relative_position_bias_table": (169, 3),
    "layers.1.blocks.0.norm2.bias": (192,),
    "layers.1.blocks.1.mlp.fc1.weight": (768, 192),
    "layers.2.blocks.5.attn.relative_position_bias_table": (169, 12),
    "layers.2.blocks.5.attn.relative_position_index": (49, 49),
    "layers.3.blocks.1.mlp.fc2.weight": (768, 3072),
    "layers.0.downsample.reduction.weight": (192, 384),
    "layers.0.downsample.norm.weight": (384,),
    "layers.2.downsample.reduction.weight": (768, 1536),
    "layers.2.downsample.norm.bias": (1536,),
    "norm1.weight": (192,),
    "norm2.bias": (384,),
    "norm3.weight": (768,),
    "norm3.bias": (768,),
}
NOT_IN_OFFICIAL = [
    "norm0.weight",  # stage-0 norm is nn.Identity for SWINT-FPN-RETINANET
    "layers.3.downsample.reduction.weight",  # last stage has no patch merging
    "layers.0.downsample.reduction.bias",  # reduction has bias=False
    "absolute_pos_embed",  # APE is off for GLIP-T
]


def test_glip_t_state_dict_names(glip_t: SwinTransformer) -> None:
    sd = glip_t.state_dict()
    for key, shape in OFFICIAL_KEYS_AND_SHAPES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    for key in NOT_IN_OFFICIAL:
        assert key not in sd, key
    assert not any("attn_mask" in k for k in sd)
    # 12 blocks x 14 entries + patch_embed 4 + 3 downsamples x 3 + norm1..3 x 2
    assert len(sd) == 12 * 14 + 4 + 9 + 6
    assert sd["layers.2.blocks.5.attn.relative_position_index"].dtype == torch.int64


def test_glip_t_parameter_count(glip_t: SwinTransformer) -> None:
    n = sum(p.numel() for p in glip_t.parameters())
    assert 27_500_000 <= n <= 28_500_000, n


def test_loads_official_style_checkpoint(glip_t: SwinTransformer) -> None:
    # An official GLIP checkpoint's "model" dict: keys prefixed "module.", other
    # sub-modules next to backbone.body. Strip the prefix and load strictly.
    prefix = "module.backbone.body."
    ckpt = {prefix + k: v.clone() for k, v in glip_t.state_dict().items()}
    ckpt[prefix + "norm3.weight"] = torch.randn(768)
    ckpt["module.backbone.fpn.fpn_inner2.weight"] = torch.zeros(256, 192, 1, 1)
    body = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    fresh = SwinTransformer()
    result = fresh.load_state_dict(body, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh.norm3.weight, body["norm3.weight"])


# --------------------------------------------------------------------------- internals
def test_relative_position_index_values() -> None:
    idx = relative_position_index(7)
    assert idx.shape == (49, 49)
    assert int(idx.min()) == 0 and int(idx.max()) == 13 * 13 - 1
    assert int(idx[0, 0]) == 6 * 13 + 6  # zero offset -> table centre
    assert int(idx[0, 48]) == 0  # key 6 rows below and 6 cols right of the query
    assert int(idx[48, 0]) == 12 * 13 + 12
    assert int(idx[0, 1]) == 6 * 13 + 5  # key one column to the right: dx = -1


def _slice_mask(hp: int, wp: int, ws: int, shift: int) -> torch.Tensor:
    """Reference: the slice-labelling construction of the original implementation."""
    img = torch.zeros(1, hp, wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("hp,wp", [(7, 7), (14, 21), (28, 14)])
def test_shifted_window_mask_matches_slices(hp: int, wp: int) -> None:
    mask = shifted_window_mask(hp, wp, 7, 3)
    assert mask.shape == ((hp // 7) * (wp // 7), 49, 49)
    torch.testing.assert_close(mask, _slice_mask(hp, wp, 7, 3))


def test_window_partition_roundtrip() -> None:
    x = torch.randn(2, 14, 21, 5)
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 2 * 3, 49, 5)
    torch.testing.assert_close(windows[0].view(7, 7, 5), x[0, :7, :7])
    torch.testing.assert_close(window_reverse(windows, 7, 14, 21), x)


def test_drop_path() -> None:
    dp = DropPath(0.5)
    x = torch.ones(2000, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    rows = y[:, 0]
    assert torch.all((rows == 0) | (rows == 2.0))
    assert torch.equal(y, rows[:, None].expand_as(y))  # whole samples dropped
    assert 0.4 < float((rows == 0).float().mean()) < 0.6
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_rates_increase_linearly(glip_t: SwinTransformer) -> None:
    rates = [
        blk.drop_path.drop_prob if isinstance(blk.drop_path, DropPath) else 0.0
        for layer in glip_t.layers
        for blk in layer.blocks
    ]
    assert len(rates) == 12
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx([0.2 * k / 11 for k in range(12)])
    assert [blk.shift_size for blk in glip_t.layers[2].blocks] == [0, 3, 0, 3, 0, 3]


# --------------------------------------------------------------------------- training
def test_gradients_flow() -> None:
    model = small_model(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    loss = sum(o.pow(2).mean() for o in model(x))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_train_mode_with_drop_path_runs() -> None:
    model = small_model(drop_path_rate=0.3).train()
    outs = model(torch.randn(2, 3, 64, 96))
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_checkpointing_matches() -> None:
    x = torch.randn(1, 3, 64, 96)
    plain = small_model(drop_path_rate=0.0).train()
    ckpt = small_model(drop_path_rate=0.0, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    outs_a = plain(x)
    outs_b = ckpt(x)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in outs_a).backward()
    sum(o.sum() for o in outs_b).backward()
    ga = plain.layers[2].blocks[1].attn.qkv.weight.grad
    gb = ckpt.layers[2].blocks[1].attn.qkv.weight.grad
    torch.testing.assert_close(ga, gb)


# ----------------------------------------------------------------------------- export
def test_onnx_export(tmp_path: Path) -> None:
    # The TorchScript exporter (dynamo=False) serialises through the onnx package.
    pytest.importorskip("onnx", reason="onnx not installed (pip install '.[export]')")
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 96)
    path = tmp_path / "swin.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["p3", "p4", "p5"],
        )
    assert path.exists() and path.stat().st_size > 0

    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime not installed: export checked, outputs not compared"
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-4, rtol=1e-4)
