"""ONNX export: checker, dynamic axes, TensorRT op support, parity with PyTorch."""

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from export.onnx_export import export_onnx
from glipv2.runtime.onnx import OrtEngine
from export.trt_ops import graph_ops, unsupported_ops
from export.verify import (LOGIT_TOLERANCE, ParityReport, compare_detections, compare_outputs, compare_understanding,
                           main, same_detections, sample_images)
import torch

from glipv2.checkpoint import load_model
from glipv2.postprocess import Detections
from glipv2.text import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "demo" / "tiny.pt"
needs_demo = pytest.mark.skipif(not DEMO.exists(), reason="demo/tiny.pt missing: run `make demo-model`")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not DEMO.exists():
        pytest.skip("demo/tiny.pt missing: run `make demo-model`")
    model, _ = load_model(DEMO)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out, top_k=100)
    return model, out


ALL_GRAPHS = ("text_encoder", "detector", "vqa", "caption_start", "caption_step")


def test_the_demo_model_exports_every_task(exported):
    _, out = exported
    assert sorted(p.stem for p in out.glob("*.onnx")) == sorted(ALL_GRAPHS)


def test_graphs_pass_the_checker_with_dynamic_axes(exported):
    _, out = exported
    for name in ALL_GRAPHS:
        onnx.checker.check_model(onnx.load(str(out / f"{name}.onnx")), full_check=True)
    step = onnx.load(str(out / "caption_step.onnx")).graph
    for tensor in [*step.input, *step.output]:
        if tensor.name in ("past_k", "past_v", "present_k", "present_v"):
            assert tensor.type.tensor_type.shape.dim[3].dim_param == "steps", tensor.name
    for name in ("text_encoder", "detector"):
        graph = onnx.load(str(out / f"{name}.onnx"))
        onnx.checker.check_model(graph, full_check=True)
        for tensor in [*graph.graph.input, *graph.graph.output]:
            dims = tensor.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch", (name, tensor.name)
            if tensor.name in ("input_ids", "attention_mask", "token_features"):
                assert dims[1].dim_param == "tokens", (name, tensor.name)
    det = onnx.load(str(out / "detector.onnx")).graph
    assert [i.name for i in det.input] == ["images", "token_features", "attention_mask"]
    assert det.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in det.output] == ["boxes", "logits", "centerness"]


def test_every_op_is_one_tensorrt_parses(exported):
    _, out = exported
    for name in ALL_GRAPHS:
        assert unsupported_ops(out / f"{name}.onnx") == {}, name
    assert "TopK" in graph_ops(onnx.load(str(out / "detector.onnx")).graph)  # selection is in the graph
    assert "NonMaxSuppression" not in graph_ops(onnx.load(str(out / "detector.onnx")).graph)


def test_op_check_catches_unsupported_and_data_dependent_ops(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [1, None])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [4])
    nodes = [helper.make_node("NonZero", ["x"], ["y"]), helper.make_node("Det", ["x"], ["z"])]
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y, z])), str(path))
    problems = unsupported_ops(path)
    assert set(problems) == {"NonZero", "Det"}
    assert "data-dependent" in problems["NonZero"] and "not supported" in problems["Det"]


def test_outputs_match_pytorch_at_other_batch_sizes(exported):
    model, out = exported
    report = ParityReport()
    compare_outputs(model, OrtEngine(out), 100, Tokenizer(), report)
    assert report.max_abs["logits"] <= LOGIT_TOLERANCE
    assert report.max_abs["boxes"] <= 1e-2  # pixels
    assert report.max_abs["token_features"] <= 1e-4
    assert report.max_abs["centerness"] <= 1e-3


def test_same_detections_on_shapes_images(exported):
    model, out = exported
    report = ParityReport()
    compare_detections(model, out, sample_images(None, 6), 100, Tokenizer(), report)
    assert report.detections > 0
    assert report.detection_mismatches == []


def test_parity_comparator_reports_a_real_mismatch(exported):
    """Against graphs of another model the comparator must not answer "same": the PyTorch
    model with its box regression bias nudged, run against the unchanged ONNX graphs."""
    model, out = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bbox_pred.bias += 0.05
    report = ParityReport()
    compare_detections(changed, out, sample_images(None, 2), 100, Tokenizer(), report)
    assert report.detections > 0
    # Boxes that moved, or (the refined boxes then overlap differently) another count after NMS.
    assert report.detection_mismatches and all("differ" in m or " detections" in m
                                               for m in report.detection_mismatches)


def test_same_detections_names_each_difference():
    ref = Detections(np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32), np.array([0.9, 0.5], np.float32),
                     np.array([0, 1]))

    def variant(boxes=ref.boxes, scores=ref.scores, phrases=ref.phrase_ids):
        return Detections(np.asarray(boxes, np.float32), np.asarray(scores, np.float32), np.asarray(phrases))

    assert same_detections(ref, variant()) is None
    assert same_detections(ref, variant(ref.boxes + 0.04, ref.scores + 5e-5)) is None  # inside the tolerances
    assert same_detections(ref, variant(ref.boxes[:1], ref.scores[:1], ref.phrase_ids[:1])) == "2 vs 1 detections"
    assert same_detections(ref, variant(phrases=[0, 0])) == "phrases differ"
    assert same_detections(ref, variant(ref.boxes + [0, 0, 0.1, 0])).startswith("boxes differ by up to 0.100")
    assert same_detections(ref, variant(scores=[0.9, 0.501])).startswith("scores differ by up to 1.00e-03")
    # two boxes of one phrase whose scores tie within float noise may come in either order
    tie = variant(phrases=[0, 0], scores=[0.70001, 0.7])
    swapped = variant(ref.boxes[::-1], [0.7, 0.70001], [0, 0])
    assert same_detections(tie, swapped) is None
    apart = variant(phrases=[0, 0])  # scores 0.9 and 0.5: no tie, the order is the boxes'
    assert same_detections(apart, variant(ref.boxes[::-1], phrases=[0, 0])).startswith("boxes differ")


def test_same_answers_and_captions_on_shapes_images(exported):
    """VQA logits and caption log-probabilities within 1e-3 at other batch sizes and cache
    lengths than the export's; then the same answers and the same greedy and beam-3
    captions from the PyTorch model and from ONNX Runtime."""
    model, out = exported
    report = ParityReport()
    compare_understanding(model, OrtEngine(out), sample_images(None, 4), Tokenizer(), report)
    assert report.max_abs["answer_logits"] <= LOGIT_TOLERANCE
    assert report.max_abs["caption_logprobs"] <= LOGIT_TOLERANCE
    assert report.answers == 4 * 5 and report.answer_mismatches == []
    assert report.captions == 4 * 2 and report.caption_mismatches == []


@needs_demo
def test_verify_cli(exported, capsys):
    _, out = exported
    assert main(["--checkpoint", str(DEMO), "--onnx-dir", str(out), "--num-images", "2"]) == 0
    assert "parity OK" in capsys.readouterr().out
    assert main(["--checkpoint", str(DEMO), "--onnx-dir", str(out / "missing")]) == 2


def test_verify_cli_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(100))
    assert main(["--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
