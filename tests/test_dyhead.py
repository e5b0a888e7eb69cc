"""GLIP's DyConv layer (deformable convs across FPN levels) exports to ONNX and runs in ONNX
Runtime like PyTorch; its correctness against the official code is tests/test_official.py."""

import numpy as np
import pytest
import torch

from glipv2.modeling.dyhead import DyConv, _as_read_by_kernel


def test_kernel_read_takes_the_first_values_of_each_image():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    got = _as_read_by_kernel(t, (2, 3))
    torch.testing.assert_close(got[1].reshape(-1), t[1].reshape(-1)[:18])


def test_dyconv_exports_and_matches_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from export.trt_ops import unsupported_ops

    torch.manual_seed(0)
    layer = DyConv(32, 8).eval()
    for p in layer.parameters():  # away from the near-zero init, so every branch matters
        p.data.normal_(0, 0.2)
    shapes = [(13, 20), (7, 10), (4, 5), (2, 3), (1, 2)]  # odd sizes, as P3-P7 of a 100 x 160 image
    feats = [torch.randn(1, 32, h, w) for h, w in shapes]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, *xs):
            return tuple(self.layer(list(xs)))

    path = tmp_path / "dyconv.onnx"
    names = [f"p{i}" for i in range(5)]
    torch.onnx.export(Wrap(), tuple(feats), str(path), opset_version=17, dynamo=False, input_names=names,
                      output_names=[f"o{i}" for i in range(5)], dynamic_axes={n: {0: "b"} for n in names})
    assert unsupported_ops(path) == {}
    batch = [torch.randn(2, 32, h, w) for h, w in shapes]  # another batch size than traced
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: x.numpy() for n, x in zip(names, batch)})
    with torch.no_grad():
        want = layer(batch)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)
