"""The Triton model repository: config schema, manifest, rendering, and the python-backend
model's batching logic (run with a stand-in for triton_python_backend_utils; the ONNX
files and the ONNX Runtime session are real)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from export import build, graphs, onnx_export, trt_ops
from export.repository import (
    FLAVOURS,
    GRAPH_SOURCES,
    PROJECT_ROOT,
    export_stamp,
    graph_source_digest,
    FORMAT,
    MODELS,
    CAPTION_MODEL,
    CAPTIONING,
    PHRASES,
    PB_TENSORS,
    PYTHON_MODEL,
    BatchingSettings,
    RepositoryError,
    SettingsError,
    build_manifest,
    manifest_of,
    model_signatures,
    render_config,
    ENGINES_KEY,
    TRT_CACHE_DIR,
    default_repository,
    render_repository,
    repository_is_current,
)
from glipv2.config import ModelConfig, get_preset
from glipv2.text import DEFAULT_BUCKETS, default_tokenizer_path
from glipv2.postprocess import SERVING_SCORE_THRESHOLD

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "tiny.pt"
COMMITTED = ROOT / "model_repository"
needs_demo = pytest.mark.skipif(
    not DEMO.is_file(), reason="demo/tiny.pt (the committed demo model) is missing; `make demo-model` writes it")


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def dtype(cfg_tensor) -> str:
    return mc.DataType.Name(cfg_tensor.data_type)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return get_preset("tiny")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("model", MODELS)
def test_config_parses_with_tritons_schema(flavour, model, tiny_cfg):
    cfg = parse(render_config(model, flavour, tiny_cfg, top_k=100, max_batch_size=8))
    assert cfg.name == model
    assert cfg.max_batch_size == 8
    inputs = {t.name: t for t in cfg.input}
    outputs = {t.name: t for t in cfg.output}
    if model == "text_encoder":
        assert list(inputs) == ["input_ids", "attention_mask"]
        assert all(dtype(t) == "TYPE_INT64" and list(t.dims) == [-1] for t in inputs.values())
        assert list(outputs["token_features"].dims) == [-1, 384]
        token_inputs = inputs.values()
    else:
        assert list(inputs["images"].dims) == [3, 256, 256] and dtype(inputs["images"]) == "TYPE_UINT8"
        assert list(inputs["token_features"].dims) == [-1, 384]
        assert list(inputs["attention_mask"].dims) == [-1]
        assert list(outputs["boxes"].dims) == [100, 4]
        assert list(outputs["logits"].dims) == [100, -1]
        assert list(outputs["centerness"].dims) == [100]
        token_inputs = [inputs["token_features"], inputs["attention_mask"]]
        assert not inputs["images"].allow_ragged_batch
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8]
    assert db.max_queue_delay_microseconds > 0
    assert db.default_queue_policy.max_queue_size > 0
    assert db.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 1
    kind = mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)

    if flavour == "cpu":
        assert cfg.backend == "python" and not cfg.platform
        assert kind == "KIND_CPU"
        assert all(t.allow_ragged_batch for t in token_inputs)
        assert cfg.parameters["onnx_file"].string_value == "model.onnx"
    elif flavour == "gpu-onnx":
        assert cfg.platform == "onnxruntime_onnx" and kind == "KIND_GPU"
        (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "tensorrt"
        assert acc.parameters["precision_mode"] == "FP16"
        shapes = dict(s.split(":") for s in acc.parameters["trt_profile_max_shapes"].split(","))
        assert set(shapes) == set(inputs)
        assert all(shapes[t.name].startswith("8x256") for t in token_inputs)  # batch 8, 256 tokens
        assert all(acc.parameters[f"trt_profile_{k}_shapes"] for k in ("min", "opt"))
        assert not any(t.allow_ragged_batch for t in cfg.input)
    else:
        assert cfg.platform == "tensorrt_plan" and kind == "KIND_GPU"
        assert cfg.default_model_filename == "model.plan"
        assert not any(t.allow_ragged_batch for t in cfg.input)


@pytest.fixture(scope="module")
def demo_cfg() -> ModelConfig:
    """The demo model's config: it has the VQA and caption heads (five graphs)."""
    if not DEMO.is_file():
        pytest.skip("demo/tiny.pt (the committed demo model) is missing; `make demo-model` writes it")
    from glipv2.checkpoint import read_checkpoint

    return ModelConfig.from_dict(read_checkpoint(DEMO)["model_config"])


def _trt_parameters(cfg_text: str) -> dict[str, str]:
    (acc,) = parse(cfg_text).optimization.execution_accelerators.gpu_execution_accelerator
    return dict(acc.parameters)


def test_gpu_onnx_engine_cache_is_one_level_with_a_prefix_per_model(demo_cfg):
    """ONNX Runtime's TensorRT provider creates only the last level of trt_engine_cache_path:
    the path must sit right below the root (compose mounts a volume there), and the models
    share it through per-model prefixes."""
    prefixes = set()
    for model in graphs.graph_specs(demo_cfg, 100):
        params = _trt_parameters(render_config(model, "gpu-onnx", demo_cfg))
        assert params["trt_engine_cache_enable"] == "1"
        assert params["trt_engine_cache_path"] == TRT_CACHE_DIR
        assert Path(TRT_CACHE_DIR).is_absolute() and Path(TRT_CACHE_DIR).parent == Path("/")
        assert not TRT_CACHE_DIR.startswith("/tmp")  # a mounted volume keeps engines across restarts
        prefixes.add(params["trt_engine_cache_prefix"])
    assert prefixes == set(graphs.graph_specs(demo_cfg, 100))
    custom = render_config("detector", "gpu-onnx", demo_cfg, settings=BatchingSettings(trt_cache_dir="/engines"))
    assert _trt_parameters(custom)["trt_engine_cache_path"] == "/engines"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_preferred_batch_sizes_scale_with_the_beams(flavour, demo_cfg):
    """caption_step runs every beam of every image: max batch 8 x 5 beams = 40, and its
    preferred sizes are 20 and 40 (not 4 and 8, which the batcher would cut at)."""
    for model, spec in graphs.graph_specs(demo_cfg, 100).items():
        cfg = parse(render_config(model, flavour, demo_cfg, max_batch_size=8))
        m = spec.batch_multiplier
        assert cfg.max_batch_size == 8 * m
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4 * m, 8 * m]
    step = parse(render_config("caption_step", flavour, demo_cfg, max_batch_size=8,
                               settings=BatchingSettings(preferred_batch_sizes=[2, 8])))
    assert list(step.dynamic_batching.preferred_batch_size) == [10, 40]


def params_of(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_caption_loop_model_config(flavour, demo_cfg):
    """The `caption` model (the decode loop inside Triton) is a python model in every
    flavour, batched by images, with the graphs' names and the end token from the one
    table; caption_start / caption_step, which only it calls, never wait in their queue."""
    from glipv2.runtime.graphs import GRAPH_IO

    cfg = parse(render_config("caption", flavour, demo_cfg, max_batch_size=8))
    assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 8
    assert mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
    assert [(t.name, dtype(t), list(t.dims), t.optional) for t in cfg.input] == [
        ("images", "TYPE_UINT8", [3, 256, 256], False), ("beam_size", "TYPE_INT32", [1], False),
        ("max_len", "TYPE_INT32", [1], False), ("found", "TYPE_UINT8", [36], True)]
    # the phrases `found` flags, in its order, and the check those flags feed
    assert json.loads(params_of(cfg)["checked_phrases"]) == list(demo_cfg.caption_checked_phrases)
    assert len(demo_cfg.caption_checked_phrases) == 36
    assert [(t.name, dtype(t), list(t.dims)) for t in cfg.output] == [
        ("tokens", "TYPE_INT64", [-1]), ("num_tokens", "TYPE_INT32", [1]), ("logprob", "TYPE_FP64", [1])]
    params = params_of(cfg)
    assert params["graphs"] == ("onnxruntime" if flavour == "cpu" else "triton")
    for graph, key in (("caption_start", "start"), ("caption_step", "step")):
        assert params[f"{key}_model"] == graph
        assert [params[f"{key}_inputs"].split(","), params[f"{key}_outputs"].split(",")] == \
            [list(names) for names in GRAPH_IO[graph]]
    assert demo_cfg.caption_tokens[int(params["end_index"])] == demo_cfg.caption_end_id
    assert int(params["max_len"]) == demo_cfg.caption_max_len - 1
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0  # it merges requests itself
    for graph in ("caption_start", "caption_step"):
        assert parse(render_config(graph, flavour, demo_cfg)).dynamic_batching.max_queue_delay_microseconds == 0
    assert parse(render_config("detector", flavour, demo_cfg)).dynamic_batching.max_queue_delay_microseconds > 0


def test_gpu_onnx_profiles_equal_the_plans_profiles(demo_cfg):
    """The gpu-onnx engines and the gpu flavour's plans are built for the same (min, opt,
    max) shapes: the profile export.tensorrt gives from the manifest."""
    from export.tensorrt import profile_shapes
    from glipv2.checkpoint import read_checkpoint

    manifest = manifest_of(demo_cfg, DEMO, read_checkpoint(DEMO), "gpu-onnx", 100, 8)
    for model in manifest.models:
        params = _trt_parameters(render_config(model, "gpu-onnx", demo_cfg, 100, 8))
        got = {}
        for i, kind in enumerate(("min", "opt", "max")):
            for item in params[f"trt_profile_{kind}_shapes"].split(","):
                name, dims = item.split(":")
                got.setdefault(name, [None, None, None])[i] = tuple(int(d) for d in dims.split("x"))
        assert {k: tuple(v) for k, v in got.items()} == profile_shapes(manifest, model), model


def test_a_misspelt_field_fails_to_parse(tiny_cfg):
    text = render_config("detector", "cpu", tiny_cfg)
    with pytest.raises(text_format.ParseError):
        parse(text.replace("max_queue_delay_microseconds", "max_queue_delay_microsecond"))


def test_settings_are_arguments(tiny_cfg):
    cfg = parse(render_config(
        "detector", "gpu", tiny_cfg, top_k=50, max_batch_size=16, settings=BatchingSettings(
            preferred_batch_sizes=[16, 2], max_queue_delay_us=500, max_queue_size=7, instance_count=3)))
    assert cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 7
    assert cfg.instance_group[0].count == 3
    assert list(cfg.output[1].dims) == [50, -1]
    glip_t = parse(render_config("detector", "cpu", get_preset("glip-t")))
    assert list(glip_t.input[0].dims) == [3, 800, 1344] and list(glip_t.input[1].dims) == [-1, 768]


@pytest.mark.parametrize("kwargs", [
    {"flavour": "tpu"}, {"max_batch_size": 0}, {"preferred_batch_sizes": [4, 16]},
    {"max_queue_size": -1}, {"instance_count": 0}, {"top_k": 5000},
])
def test_invalid_settings_are_refused(kwargs, tiny_cfg):
    args = {"flavour": "cpu", "top_k": 100, "max_batch_size": 8} | kwargs
    flavour, top_k, mbs = args.pop("flavour"), args.pop("top_k"), args.pop("max_batch_size")
    with pytest.raises(SettingsError):
        render_config("detector", flavour, tiny_cfg, top_k, mbs, BatchingSettings(**args))


# --------------------------------------------------------------------------- committed repository


@needs_demo
def test_committed_repository_matches_a_fresh_render():
    """model_repository/ in git is what `make export` renders now for demo/tiny.pt
    (defaults: cpu, top-K 100, max batch 8): a stale committed config fails here."""
    from glipv2.checkpoint import read_checkpoint

    ckpt = read_checkpoint(DEMO)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    for model in MODELS:
        committed = (COMMITTED / model / "config.pbtxt").read_text()
        parse(committed)
        assert committed == render_config(model, "cpu", cfg, 100, 8), f"{model}: run `make export`"
        rendered = COMMITTED / model / "1" / "model.py"  # generated, not in git
        assert not rendered.exists() or rendered.read_bytes() == PYTHON_MODEL.read_bytes()
    assert (COMMITTED / "caption" / "config.pbtxt").read_text() == render_config("caption", "cpu", cfg, 100, 8)
    manifest = json.loads((COMMITTED / "manifest.json").read_text())
    assert manifest == build_manifest(cfg, DEMO, ckpt, "cpu", 100, 8), "manifest.json is stale: run `make export`"
    ignored = (COMMITTED / ".gitignore").read_text().split()
    assert {"*.onnx", "*.plan", "tokenizer.json", "*/1/model.py", "*/1/*.py"} <= set(ignored)
    assert (COMMITTED / "README.md").is_file()


@needs_demo
def test_manifest():
    from glipv2.checkpoint import file_sha256, read_checkpoint

    ckpt = read_checkpoint(DEMO)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    m = build_manifest(cfg, DEMO, ckpt, "gpu", 100, 8)
    assert list(m) == ["format", "flavour", "checkpoint", "preset", "model_config", "tokenizer", "max_tokens",
                       "token_buckets", "image", "top_k", "max_batch_size", "models", "postprocess",
                       "answer_vocabulary", "caption"]
    assert m["format"] == FORMAT and m["flavour"] == "gpu"
    assert m["checkpoint"] == {"path": "demo/tiny.pt", "sha256": file_sha256(DEMO), "step": ckpt["step"],
                               "metrics": json.loads(json.dumps(ckpt.get("metrics", {})))}
    assert m["preset"] == "tiny" and ModelConfig.from_dict(m["model_config"]) == cfg
    assert m["tokenizer"] == "tokenizer.json" and m["max_tokens"] == 256
    assert m["token_buckets"] == list(DEFAULT_BUCKETS)
    assert m["image"] == {"hw": [256, 256], "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "pad_value": 114,
                          "max_side": 0, "normalisation": {"mean": [123.675, 116.28, 103.53],
                                                           "std": [58.395, 57.12, 57.375],
                                                           "channel_order": "RGB", "scale": "0-255"}}
    assert (m["top_k"], m["max_batch_size"]) == (100, 8)
    assert m["answer_vocabulary"] == list(cfg.vqa_answers) and "red" in m["answer_vocabulary"]
    assert m["caption"] == {"tokens": list(cfg.caption_tokens), "start_id": 101, "end_id": 102,
                            "max_len": cfg.caption_max_len - 1, "decoder": "caption",
                            "words": list(cfg.caption_words), "checked_phrases": list(cfg.caption_checked_phrases),
                            "check_threshold": cfg.caption_check_threshold}
    assert {"hexagon", "red"} <= set(cfg.caption_words) and "he" not in cfg.caption_words
    assert "purple hexagon" in cfg.caption_checked_phrases and cfg.caption_check_threshold == 0.4
    assert set(m["models"]) == {"text_encoder", "detector", "vqa", "caption_start", "caption_step"}
    assert m["models"]["caption_step"]["max_batch_size"] == 8 * 5  # every beam of every image
    assert m["models"]["caption_step"]["dynamic_axis"] == {"counts": "steps", "min": 1, "opt": 16,
                                                           "max": cfg.caption_max_len - 1}
    assert m["models"]["text_encoder"]["inputs"] == {"input_ids": {"dtype": "INT64", "dims": [-1]},
                                                     "attention_mask": {"dtype": "INT64", "dims": [-1]}}
    assert m["models"]["detector"]["outputs"]["logits"] == {"dtype": "FP32", "dims": [100, -1]}
    assert m["postprocess"] == {"score_threshold": SERVING_SCORE_THRESHOLD, "pre_nms_topk": 1000, "nms_iou": 0.6,
                                "max_detections": 100, "threshold_on": "score",
                                "token_aggregation": cfg.token_aggregation, "phrase_tokens": "head"}
    json.dumps(m)


# --------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    if not DEMO.is_file():
        pytest.skip("demo/tiny.pt (the committed demo model) is missing; `make demo-model` writes it")
    return render_repository(DEMO, tmp_path_factory.mktemp("render") / "repo", flavour="cpu")


def test_render_writes_a_complete_repository(rendered):
    for model in MODELS:
        assert (rendered / model / "1" / "model.onnx").stat().st_size > 1000
        assert (rendered / model / "1" / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
        parse((rendered / model / "config.pbtxt").read_text())
    assert (rendered / "tokenizer.json").read_bytes() == default_tokenizer_path().read_bytes()
    # the caption loop: its model, the tensor helpers and glipv2/captioning.py as is, no ONNX of its own
    loop = rendered / "caption" / "1"
    assert sorted(p.name for p in loop.iterdir() if p.suffix == ".py") == ["glipv2_captioning.py", "glipv2_phrases.py",
                                                                            "model.py", "pb_tensors.py"]
    assert (loop / "glipv2_phrases.py").read_bytes() == PHRASES.read_bytes()
    assert (loop / "model.py").read_bytes() == CAPTION_MODEL.read_bytes()
    assert (loop / "glipv2_captioning.py").read_bytes() == CAPTIONING.read_bytes()
    assert (loop / "pb_tensors.py").read_bytes() == PB_TENSORS.read_bytes()
    assert not (loop / "model.onnx").exists()
    manifest = json.loads((rendered / "manifest.json").read_text())
    assert manifest["flavour"] == "cpu" and manifest["checkpoint"]["path"] == "demo/tiny.pt"
    assert "*.onnx" in (rendered / ".gitignore").read_text()
    assert not [p for p in rendered.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def _fake_export(source: Path):
    """export_onnx stand-in that copies already exported graphs (the export is the slow part)."""
    def export(model, out_dir, top_k=100):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in model_signatures(model.cfg, top_k):
            files[name] = out_dir / f"{name}.onnx"
            shutil.copyfile(source / name / "1" / "model.onnx", files[name])
        return files
    return export


def test_rerender_replaces_the_folder_and_keeps_readme(rendered, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "export_onnx", _fake_export(rendered))
    out = tmp_path / "repo"
    render_repository(DEMO, out, flavour="cpu")
    (out / "stale.txt").write_text("left over from an older render")
    (out / "README.md").write_text("hand-written\n")
    render_repository(DEMO, out, flavour="gpu", max_batch_size=4, replace_flavour=True)
    assert not (out / "stale.txt").exists()
    assert (out / "README.md").read_text() == "hand-written\n"
    assert not (out / "detector" / "1" / "model.py").exists()  # gpu: no python backend
    assert (out / "caption" / "1" / "model.py").read_bytes() == CAPTION_MODEL.read_bytes()  # but the loop is python
    assert (out / "detector" / "1" / "model.onnx").is_file()  # export.tensorrt builds model.plan from it
    assert parse((out / "detector" / "config.pbtxt").read_text()).max_batch_size == 4
    assert json.loads((out / "manifest.json").read_text())["flavour"] == "gpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_rerender_keeps_built_plans_and_their_record(rendered, tmp_path, monkeypatch):
    """`make export` (or `make serve` falling through to it) must not delete the engines
    a GPU host spent minutes building; the engine record travels with them."""
    monkeypatch.setattr(onnx_export, "export_onnx", _fake_export(rendered))
    out = tmp_path / "repo-gpu"
    render_repository(DEMO, out, flavour="gpu")
    (out / "detector" / "1" / "model.plan").write_bytes(b"engine bytes")
    manifest = json.loads((out / "manifest.json").read_text())
    record = {"tensorrt_version": "10.5.0", "gpu": "NVIDIA A10G", "checkpoint_sha256": "x"}
    (out / "manifest.json").write_text(json.dumps({**manifest, ENGINES_KEY: record}))
    render_repository(DEMO, out, flavour="gpu")
    assert (out / "detector" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert not (out / "text_encoder" / "1" / "model.plan").exists()
    assert json.loads((out / "manifest.json").read_text())[ENGINES_KEY] == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo-gpu"]


def test_flavours_render_into_their_own_folders(rendered, tmp_path, monkeypatch, capsys):
    """FLAVOUR=gpu must not overwrite the committed cpu configs: each flavour has its own
    default folder, and a repository of another flavour is replaced only when asked."""
    assert default_repository("cpu") == Path("model_repository")
    assert default_repository("gpu") == Path("model_repository-gpu")
    assert default_repository("gpu-onnx") == Path("model_repository-gpu-onnx")
    assert "model_repository-*/" in (ROOT / ".gitignore").read_text().split()
    monkeypatch.setattr(onnx_export, "export_onnx", _fake_export(rendered))
    out = tmp_path / "repo"
    render_repository(DEMO, out, flavour="cpu")
    before = (out / "detector" / "config.pbtxt").read_text()
    with pytest.raises(SettingsError, match="model_repository-gpu"):
        render_repository(DEMO, out, flavour="gpu")
    assert (out / "detector" / "config.pbtxt").read_text() == before
    assert build.main(["--checkpoint", str(DEMO), "--out", str(out), "--flavour", "gpu-onnx"]) == 2
    assert "--force" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the default --out is relative to the working directory
    assert build.main(["--checkpoint", str(DEMO), "--flavour", "gpu"]) == 0
    assert json.loads((tmp_path / "model_repository-gpu" / "manifest.json").read_text())["flavour"] == "gpu"
    assert (out / "detector" / "config.pbtxt").read_text() == before


def test_if_changed_skips_a_current_repository(rendered, tmp_path, monkeypatch, capsys):
    """compose's exporter runs on every `up`: it re-exports only when something changed."""
    out = tmp_path / "repo"
    shutil.copytree(rendered, out)
    assert repository_is_current(DEMO, out, "cpu", 100, 8)
    assert build.main(["--checkpoint", str(DEMO), "--out", str(out), "--if-changed"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert not repository_is_current(DEMO, out, "cpu", 100, 4)  # another max batch
    assert not repository_is_current(DEMO, out, "cpu", 100, 8, BatchingSettings(max_queue_size=3))
    stale = out / "caption" / "1" / "glipv2_captioning.py"
    stale.write_text(stale.read_text() + "# an older copy\n")
    assert not repository_is_current(DEMO, out, "cpu", 100, 8)  # a stale copy of a python file
    shutil.copyfile(CAPTIONING, stale)
    assert repository_is_current(DEMO, out, "cpu", 100, 8)
    # After a pull that brings a new checkpoint with its committed manifest, the ignored ONNX
    # files on disk are still the old model's.
    stamp = (rendered / "exported-from.sha256").read_text()
    sha = stamp.split()[0]
    (out / "exported-from.sha256").write_text(stamp.replace(sha, "0" * 64))
    assert not repository_is_current(DEMO, out, "cpu", 100, 8)
    # Same checkpoint, ONNX files traced by other model code (a refactor that changed a graph).
    (out / "exported-from.sha256").write_text(export_stamp(sha).replace(graph_source_digest(), "1" * 64))
    assert not repository_is_current(DEMO, out, "cpu", 100, 8)
    shutil.copyfile(rendered / "exported-from.sha256", out / "exported-from.sha256")
    assert repository_is_current(DEMO, out, "cpu", 100, 8)
    (out / "vqa" / "1" / "model.onnx").unlink()
    assert not repository_is_current(DEMO, out, "cpu", 100, 8)
    monkeypatch.setattr(onnx_export, "export_onnx", _fake_export(rendered))
    assert build.main(["--checkpoint", str(DEMO), "--out", str(out), "--if-changed"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "vqa" / "1" / "model.onnx").is_file()


def test_graph_source_digest_follows_the_model_code(tmp_path):
    """A change in any file the graphs are traced from changes the digest; other files do not."""
    for rel in GRAPH_SOURCES:
        src = PROJECT_ROOT / rel
        if src.is_dir():
            shutil.copytree(src, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp_path / rel)
    assert graph_source_digest(tmp_path) == graph_source_digest()
    (tmp_path / "glipv2" / "postprocess.py").write_text("# not traced\n")
    assert graph_source_digest(tmp_path) == graph_source_digest()
    head = tmp_path / "glipv2" / "modeling" / "head.py"
    head.write_text(head.read_text().replace("_LOGIT_CLAMP = 50000.0", "_LOGIT_CLAMP = 100.0"))
    assert graph_source_digest(tmp_path) != graph_source_digest()


def test_render_refuses_an_op_tensorrt_cannot_parse(rendered, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "export_onnx", _fake_export(rendered))
    monkeypatch.setattr(trt_ops, "unsupported_ops",
                        lambda path: {"NonZero": "data-dependent; keep it outside the engine"}
                        if "detector" in Path(path).name else {})
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    with pytest.raises(RepositoryError, match="NonZero") as err:
        render_repository(DEMO, out)
    assert "detector" in str(err.value) and not isinstance(err.value, SettingsError)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert build.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and err.count("\n") == 1
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert build.main(["--checkpoint", str(corrupt), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "corrupt" in err and err.count("\n") == 1
    assert build.main(["--checkpoint", str(corrupt), "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- python backend model.py


class _FakeTensor:
    """pb_utils.Tensor: numpy in and out, and DLPack capsules (model.py's path on numpy 2)."""

    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def to_dlpack(self):
        return np.array(self._array, copy=True).__dlpack__()  # the capsule keeps the copy alive

    @classmethod
    def from_dlpack(cls, name, capsule):
        class Holder:
            def __dlpack__(self, *args, **kwargs):
                return capsule

            def __dlpack_device__(self):
                return (1, 0)

        return cls(name, np.from_dlpack(Holder()))


class _FakeError:
    INVALID_ARG = 3

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class _FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self._outputs, self._error = list(output_tensors or []), error

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def as_dict(self):
        return {t.name(): t.as_numpy() for t in self._outputs}


class _FakeRequest:
    def __init__(self, **inputs):
        self.inputs = {k: _FakeTensor(k, v) for k, v in inputs.items()}


def _fake_pb_utils() -> types.ModuleType:
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = _FakeTensor
    mod.TritonError = _FakeError
    mod.InferenceResponse = _FakeResponse
    mod.TritonModelException = type("TritonModelException", (Exception,), {})
    mod.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return mod


@pytest.fixture(scope="module")
def backend(rendered):
    """{model: initialised TritonPythonModel} loaded from the rendered repository's model.py."""
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    models = {}
    try:
        for model in MODELS:
            path = rendered / model / "1" / "model.py"
            spec = importlib.util.spec_from_file_location(f"_triton_{model}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            config = parse((rendered / model / "config.pbtxt").read_text())
            instance = module.TritonPythonModel()
            instance.initialize({
                # protobuf JSON, as Triton hands it over (int64 dims may arrive as strings)
                "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                "model_repository": str(rendered / model), "model_version": "1", "model_name": model,
                "model_instance_kind": "CPU", "model_instance_device_id": "0",
            })
            models[model] = instance
        yield models
    finally:
        mp.undo()


def _prompt(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 5000, size=(1, length), dtype=np.int64)
    ids[0, 0], ids[0, -1] = 101, 102
    return ids, np.ones_like(ids)


def _ok(response) -> dict[str, np.ndarray]:
    assert not response.has_error(), response.error().message()
    return response.as_dict()


def test_python_backend_batches_different_token_lengths(backend):
    text, det = backend["text_encoder"], backend["detector"]
    prompts = [_prompt(5, 0), _prompt(12, 1), _prompt(8, 2)]
    requests = [_FakeRequest(input_ids=i, attention_mask=m) for i, m in prompts]
    together = [_ok(r) for r in text.execute(requests)]
    alone = [_ok(text.execute([r])[0]) for r in requests]
    features = []
    for (ids, _), t, a in zip(prompts, together, alone):
        assert t["token_features"].shape == (1, ids.shape[1], 384) == a["token_features"].shape
        assert t["token_features"].dtype == np.float32
        np.testing.assert_allclose(t["token_features"], a["token_features"], atol=1e-5)
        features.append(a["token_features"])

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(1, 3, 256, 256), dtype=np.uint8) for _ in prompts]
    requests = [_FakeRequest(images=im, token_features=f, attention_mask=m)
                for im, f, (_, m) in zip(images, features, prompts)]
    together = [_ok(r) for r in det.execute(requests)]
    alone = [_ok(det.execute([r])[0]) for r in requests]
    for (ids, _), t, a in zip(prompts, together, alone):
        assert t["logits"].shape == (1, 100, ids.shape[1]) and t["boxes"].shape == (1, 100, 4)
        assert t["centerness"].shape == (1, 100)
        _assert_same_top_k(t, a, atol=1e-4)


def _assert_same_top_k(got: dict, want: dict, atol: float) -> None:
    """One image's top-k anchors (boxes, logits, centerness) equal up to the order of anchors
    whose ranking scores tie: batching changes float rounding enough to swap two anchors of
    equal score (CI saw ranks 91 and 92 trade places)."""
    def score(o):  # GLIPv2.top_k's ranking key (every token of these prompts is real)
        return 1 / (1 + np.exp(-o["logits"][0].max(-1))) / (1 + np.exp(-o["centerness"][0]))

    np.testing.assert_allclose(score(got), score(want), atol=atol, err_msg="the score at each rank")
    rows_got, rows_want = ([np.concatenate([o["boxes"][0], o["centerness"][0][:, None], o["logits"][0]], axis=1)
                            for o in (got, want)])
    dist = np.abs(rows_got[:, None] - rows_want[None]).max(-1)  # [K, K]
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(len(match))), "an anchor is missing"
    assert dist[np.arange(len(match)), match].max() <= atol, dist[np.arange(len(match)), match].max()


def test_python_backend_request_with_batch_of_two(backend):
    text = backend["text_encoder"]
    (i1, m1), (i2, m2) = _prompt(6, 3), _prompt(6, 4)
    short = _prompt(3, 5)
    pair = _FakeRequest(input_ids=np.concatenate([i1, i2]), attention_mask=np.concatenate([m1, m2]))
    pair, single = text.execute([pair, _FakeRequest(input_ids=short[0], attention_mask=short[1])])
    out = _ok(pair)["token_features"]
    assert out.shape == (2, 6, 384)
    np.testing.assert_allclose(out[1:], _ok(text.execute([_FakeRequest(input_ids=i2, attention_mask=m2)])[0])
                               ["token_features"], atol=1e-5)
    assert _ok(single)["token_features"].shape == (1, 3, 384)


def test_python_backend_malformed_requests_get_their_own_error(backend):
    text = backend["text_encoder"]
    ids, mask = _prompt(7, 6)
    good = _FakeRequest(input_ids=ids, attention_mask=mask)
    bad = [
        _FakeRequest(input_ids=ids),  # missing attention_mask
        _FakeRequest(input_ids=ids.astype(np.int32), attention_mask=mask),  # wrong dtype
        _FakeRequest(input_ids=ids, attention_mask=mask[:, :5]),  # token lengths disagree
        _FakeRequest(input_ids=ids[0], attention_mask=mask[0]),  # no batch axis
        _FakeRequest(input_ids=np.full((1, 4), 10**7, np.int64), attention_mask=np.ones((1, 4), np.int64)),  # ORT fails
    ]
    responses = text.execute([bad[0], good, *bad[1:]])
    assert len(responses) == 6
    expected = _ok(text.execute([good])[0])["token_features"]
    np.testing.assert_allclose(_ok(responses[1])["token_features"], expected, atol=1e-5)
    for r, needle in zip([responses[0], *responses[2:]],
                         ["missing input", "int32", "token length", "shape", "inference failed"]):
        assert r.has_error() and needle in r.error().message(), r.error().message()
        assert r.error().code == _FakeError.INVALID_ARG


def test_if_changed_re_exports_another_checkpoint(rendered, tmp_path, monkeypatch, capsys):
    """`make serve CHECKPOINT=...` runs export.build --if-changed: a repository rendered from
    another checkpoint of the same model is re-exported, and its manifest names the new one."""
    import hashlib

    import torch

    from glipv2.checkpoint import atomic_save

    out = tmp_path / "repo"
    shutil.copytree(rendered, out)
    ckpt = torch.load(DEMO, weights_only=False, map_location="cpu")
    ckpt["step"] = 7  # same model config and weights, other bytes: another checkpoint
    other = tmp_path / "mine.pt"
    atomic_save(ckpt, other)
    assert not repository_is_current(other, out, "cpu", 100, 8)
    monkeypatch.setattr(onnx_export, "export_onnx", _fake_export(rendered))
    assert build.main(["--checkpoint", str(other), "--out", str(out), "--if-changed"]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert manifest["checkpoint"]["step"] == 7
    assert repository_is_current(other, out, "cpu", 100, 8)


# --------------------------------------------------------------------------- the caption loop model


@pytest.fixture(scope="module")
def caption_loop(rendered):
    """The rendered `caption` model (cpu flavour: the graphs run by ONNX Runtime in its
    process), initialised with the stand-in pb_utils."""
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    for name in ("pb_tensors", "glipv2_captioning", "glipv2_phrases"):  # the rendered copies, imported afresh
        mp.delitem(sys.modules, name, raising=False)
    try:
        spec = importlib.util.spec_from_file_location("_triton_caption", rendered / "caption" / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = parse((rendered / "caption" / "config.pbtxt").read_text())
        instance = module.TritonPythonModel()
        instance.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                             "model_repository": str(rendered / "caption"), "model_version": "1",
                             "model_name": "caption"})
        yield instance
    finally:
        mp.undo()


def test_caption_loop_model_batches_requests_and_equals_the_gateways_decoder(caption_loop, rendered):
    """Images of all requests with the same beam size decode in one lockstep batch (one
    caption_start call per beam size); every image's caption equals glipv2.captioning's
    beam search over the embedded engine; a bad request gets its own error."""
    from glipv2.captioning import MentionRules, beam_search
    from glipv2.image import letterbox
    from glipv2.phrases import ends_on_phrase, repeated_mention
    from glipv2.runtime.onnx import OrtEngine
    from glipv2.text import Tokenizer
    from glipv2.understanding import caption_pieces
    from training import shapes_world as sw

    rng = np.random.default_rng(31)
    images = np.stack([letterbox(sw.render(sw.sample_scene(rng), rng), (256, 256))[0] for _ in range(4)])

    def request(idx, beam, limits):
        return _FakeRequest(images=images[idx], beam_size=np.full((len(idx), 1), beam, np.int32),
                            max_len=np.asarray(limits, np.int32).reshape(-1, 1))

    requests = [request([0, 1], 1, [20, 3]), request([2], 3, [20]), request([3], 6, [20]),
                request([3], 1, [20]), request([0], 1, [0]), _FakeRequest(images=images[:1])]
    starts = []
    start = caption_loop.engine.start_graph
    caption_loop.engine.start_graph = lambda *a: starts.append(a[0].shape[0]) or start(*a)
    try:
        responses = caption_loop.execute(requests)
    finally:
        caption_loop.engine.start_graph = start
    assert sorted(starts) == [1, 3]  # beam 1: images 0, 1 and 3 of two requests together; beam 3: image 2
    for r, needle in zip(responses[2::2], ["beam_size must be in 1..5", "max_len must be in 1..39",
                                           "missing input 'beam_size'"]):
        assert r.has_error() and needle in r.error().message(), r.error().message()
    ort = OrtEngine(rendered).captioner
    end = caption_loop.end_index
    # the same decode rules as the embedded backend's, from the same shortlist strings
    manifest = json.loads((rendered / "manifest.json").read_text())
    pieces = caption_pieces(Tokenizer(), manifest["caption"]["tokens"])
    assert caption_loop.rules.pieces == pieces
    assert caption_loop.rules.words == frozenset(manifest["caption"]["words"])
    rules = MentionRules(pieces, repeated_mention, ends_on_phrase, manifest["caption"]["words"])
    for r, idx, beam, limits in ((responses[0], [0, 1], 1, [20, 3]), (responses[1], [2], 3, [20]),
                                 (responses[3], [3], 1, [20])):
        out = _ok(r)
        for row, (i, limit) in enumerate(zip(idx, limits)):
            (want,) = beam_search(ort, images[i:i + 1], end, beam, limit, rules=rules)
            n = int(out["num_tokens"][row, 0])
            assert n == len(want.tokens) <= limit
            assert out["tokens"][row, :n].tolist() == want.tokens and (out["tokens"][row, n:] == -1).all()
            assert abs(out["logprob"][row, 0] - want.logprob) < 1e-4
    first = _ok(responses[0])["num_tokens"]
    # its own limit, not its batch neighbour's (within it, the rules end it on a whole phrase)
    assert first[1, 0] <= 3 < first[0, 0]
