"""The plain-PyTorch modulated deformable conv against a slow loop reference, ONNX Runtime
and the TensorRT op check."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glipv2.modeling.deform_conv import ModulatedDeformConv, conv_output_size, modulated_deform_conv2d


def _bilinear(img: np.ndarray, h: float, w: float) -> np.ndarray:
    """The official kernel's dmcn_im2col_bilinear: each of the four corners counts only
    when it lies inside the image; img [C, H, W]."""
    height, width = img.shape[1:]
    h_low, w_low = int(np.floor(h)), int(np.floor(w))
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = h - h_low, w - w_low
    hh, hw = 1 - lh, 1 - lw
    zero = np.zeros(img.shape[0])
    v1 = img[:, h_low, w_low] if h_low >= 0 and w_low >= 0 else zero
    v2 = img[:, h_low, w_high] if h_low >= 0 and w_high <= width - 1 else zero
    v3 = img[:, h_high, w_low] if h_high <= height - 1 and w_low >= 0 else zero
    v4 = img[:, h_high, w_high] if h_high <= height - 1 and w_high <= width - 1 else zero
    return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4


def reference(x, offset, mask, weight, bias, stride, padding, dilation):
    """Explicit loops over images, output positions and kernel taps (float64), following
    modulated_deformable_im2col_gpu_kernel: tap t = i * kw + j reads its dy at offset
    channel 2t and dx at 2t + 1; a sample counts only when -1 < h < H and -1 < w < W."""
    x, offset, mask, weight = (np.asarray(a, np.float64) for a in (x, offset, mask, weight))
    b, c, height, width = x.shape
    o, _, kh, kw = weight.shape
    ho = (height + 2 * padding - (dilation * (kh - 1) + 1)) // stride + 1
    wo = (width + 2 * padding - (dilation * (kw - 1) + 1)) // stride + 1
    out = np.zeros((b, o, ho, wo))
    for n in range(b):
        for y in range(ho):
            for xx in range(wo):
                col = np.zeros((c, kh, kw))
                for i in range(kh):
                    for j in range(kw):
                        t = i * kw + j
                        h_im = y * stride - padding + i * dilation + offset[n, 2 * t, y, xx]
                        w_im = xx * stride - padding + j * dilation + offset[n, 2 * t + 1, y, xx]
                        val = np.zeros(c)
                        if -1 < h_im < height and -1 < w_im < width:
                            val = _bilinear(x[n], h_im, w_im)
                        col[:, i, j] = val * mask[n, t, y, xx]
                out[n, :, y, xx] = np.tensordot(weight, col, axes=([1, 2, 3], [0, 1, 2]))
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


def _inputs(seed, b, c, h, w, o, stride, padding, dilation, offset_scale):
    g = torch.Generator().manual_seed(seed)
    ho = conv_output_size(h, 3, stride, padding, dilation)
    wo = conv_output_size(w, 3, stride, padding, dilation)
    x = torch.randn(b, c, h, w, generator=g)
    # Large offsets: many taps land outside the image, some exactly between pixels.
    offset = torch.randn(b, 18, ho, wo, generator=g) * offset_scale
    offset[:, :, 0, 0] = torch.tensor([-1.0, 0.5] * 9)  # a tap exactly on the -1 border
    mask = torch.rand(b, 9, ho, wo, generator=g)
    weight = torch.randn(o, c, 3, 3, generator=g)
    bias = torch.randn(o, generator=g)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("b,c,h,w,o,stride,padding,dilation,scale", [
    (2, 3, 5, 7, 4, 1, 1, 1, 3.0),   # non-square, offsets reaching well outside
    (1, 2, 7, 4, 3, 2, 1, 1, 2.0),   # stride 2 (DyHead's down-sampling conv), tall input
    (1, 2, 6, 5, 2, 1, 2, 2, 1.5),   # dilation
    (1, 2, 1, 3, 2, 1, 1, 1, 0.7),   # a one-pixel-high map (P7 of a small image)
])
def test_matches_loop_reference(b, c, h, w, o, stride, padding, dilation, scale):
    x, offset, mask, weight, bias = _inputs(0, b, c, h, w, o, stride, padding, dilation, scale)
    ours = modulated_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation)
    ref = reference(x, offset, mask, weight, bias, stride, padding, dilation)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_zero_offsets_and_unit_mask_are_a_plain_convolution():
    x, _, _, weight, bias = _inputs(1, 2, 4, 9, 6, 5, 2, 1, 1, 0.0)
    ho, wo = conv_output_size(9, 3, 2, 1), conv_output_size(6, 3, 2, 1)
    ours = modulated_deform_conv2d(x, torch.zeros(2, 18, ho, wo), torch.ones(2, 9, ho, wo), weight, bias, 2, 1)
    torch.testing.assert_close(ours, F.conv2d(x, weight, bias, stride=2, padding=1), rtol=1e-5, atol=1e-5)


def test_samples_entirely_outside_give_the_bias():
    x, offset, mask, weight, bias = _inputs(2, 1, 3, 4, 5, 2, 1, 1, 1, 0.0)
    far = torch.full_like(offset, 50.0)
    out = modulated_deform_conv2d(x, far, mask, weight, bias, 1, 1)
    torch.testing.assert_close(out, bias[None, :, None, None].expand_as(out))


def test_exports_to_onnx_and_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from export.trt_ops import unsupported_ops

    torch.manual_seed(0)
    conv = ModulatedDeformConv(3, 4, 3, stride=1, padding=1).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, offset, mask):
            return self.conv(x, offset, mask)

    x, offset, mask, _, _ = _inputs(3, 1, 3, 6, 10, 4, 1, 1, 1, 2.0)
    path = tmp_path / "dcn.onnx"
    torch.onnx.export(Wrap(), (x, offset, mask), str(path), opset_version=17, dynamo=False,
                      input_names=["x", "offset", "mask"], output_names=["y"],
                      dynamic_axes={n: {0: "b", 2: "h", 3: "w"} for n in ("x", "offset", "mask", "y")})
    assert unsupported_ops(path) == {}
    # Run it at another (non-square) size than the one it was traced at.
    x, offset, mask, _, _ = _inputs(4, 2, 3, 9, 5, 4, 1, 1, 1, 3.0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "offset": offset.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        want = conv(x, offset, mask).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
