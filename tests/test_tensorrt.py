"""export.tensorrt: what a CPU machine can check (profile shapes from the manifest, the
CLI's exit codes and messages, detection parity logic), plus a GPU-only engine build.

The GPU test needs the tensorrt package (10.x) and a CUDA GPU; it is skipped elsewhere.
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from glipv2.runtime.graphs import model_file
from glipv2.runtime.manifest import FORMAT, Manifest

from export import tensorrt as ets
from glipv2.postprocess import Detections

ROOT = Path(__file__).resolve().parents[1]
HW = (800, 1344)
TEXT_DIM = 384


def sample_manifest(image_hw=HW, text_dim=TEXT_DIM, top_k=100, max_batch_size=8, **extra) -> dict:
    """Shaped like export/repository.py's manifest.json (dims exclude the batch axis)."""
    h, w = image_hw
    manifest = {
        "format": FORMAT,
        "flavour": "gpu",
        "checkpoint": {"path": "demo/tiny.pt", "sha256": "0" * 64},
        "preset": "tiny",
        "model_config": {"image_hw": [h, w], "text_dim": text_dim, "max_tokens": 256},
        "tokenizer": "tokenizer.json",
        "max_tokens": 256,
        "token_buckets": [16, 32, 64, 128, 256],
        "image": {"hw": [h, w], "pad_value": 114, "max_side": 0, "normalisation": None},
        "top_k": top_k,
        "max_batch_size": max_batch_size,
        "models": {
            "text_encoder": {
                "inputs": {"input_ids": {"dtype": "INT64", "dims": [-1]},
                           "attention_mask": {"dtype": "INT64", "dims": [-1]}},
                "outputs": {"token_features": {"dtype": "FP32", "dims": [-1, text_dim]}},
                "max_batch_size": max_batch_size,
            },
            "detector": {
                "inputs": {"images": {"dtype": "UINT8", "dims": [3, h, w]},
                           "token_features": {"dtype": "FP32", "dims": [-1, text_dim]},
                           "attention_mask": {"dtype": "INT64", "dims": [-1]}},
                "outputs": {"boxes": {"dtype": "FP32", "dims": [top_k, 4]},
                            "logits": {"dtype": "FP32", "dims": [top_k, -1]},
                            "centerness": {"dtype": "FP32", "dims": [top_k]}},
                "max_batch_size": max_batch_size,
            },
        },
    }
    manifest.update(extra)
    return manifest


def sample(**kw) -> Manifest:
    """sample_manifest(**kw) read as the Manifest export.tensorrt takes."""
    return Manifest.from_dict(sample_manifest(**kw))


def write_repository(root: Path, manifest: dict, onnx: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    if onnx:
        for model in manifest["models"]:
            (root / model / "1").mkdir(parents=True, exist_ok=True)
            (root / model / "1" / "model.onnx").write_bytes(b"not parsed before the environment check")
    return root


# ----------------------------------------------------------------------------- profiles


def test_profile_shapes_text_encoder():
    shapes = ets.profile_shapes(sample(), "text_encoder")
    assert set(shapes) == {"input_ids", "attention_mask"}
    for name in shapes:
        assert shapes[name] == ((1, 1), (4, 64), (8, 256))


def test_profile_shapes_detector():
    shapes = ets.profile_shapes(sample(), "detector")
    assert set(shapes) == {"images", "token_features", "attention_mask"}
    lo, opt, hi = shapes["images"]
    assert (lo, opt, hi) == ((1, 3, *HW), (4, 3, *HW), (8, 3, *HW))  # image dims fixed, batch 1..8
    lo, opt, hi = shapes["token_features"]
    assert (lo[:2], hi[:2]) == ((1, 1), (8, 256))  # batch 1..8, tokens 1..256
    assert lo[2] == opt[2] == hi[2] == TEXT_DIM  # last dim = text_dim
    assert shapes["attention_mask"] == ((1, 1), (4, 64), (8, 256))
    # inputs that share the token axis get the same token range
    assert shapes["token_features"][1][1] == shapes["attention_mask"][1][1]


def test_profile_shapes_follow_the_manifest():
    m = sample_manifest(image_hw=(256, 256), text_dim=768, max_batch_size=1)
    m["max_tokens"], m["token_buckets"] = 128, []
    shapes = ets.profile_shapes(Manifest.from_dict(m), "detector")
    assert shapes["images"] == ((1, 3, 256, 256),) * 3
    assert shapes["token_features"] == ((1, 1, 768), (1, 32, 768), (1, 128, 768))
    shapes = ets.profile_shapes(sample(), "text_encoder", opt_batch=8, opt_tokens=16)
    assert shapes["input_ids"] == ((1, 1), (8, 16), (8, 256))


def test_profile_shapes_names_match_the_exported_graphs():
    graphs = pytest.importorskip("export.graphs")  # imports torch
    from glipv2.config import get_preset

    m = sample()
    specs = graphs.graph_specs(get_preset("tiny").replace(image_hw=HW, text_dim=TEXT_DIM), 100)
    assert set(ets.profile_shapes(m, "text_encoder")) == set(specs["text_encoder"].inputs)
    assert set(ets.profile_shapes(m, "detector")) == set(specs["detector"].inputs)
    for name, (_, dims) in specs["detector"].inputs.items():
        assert list(m.models["detector"].inputs[name].dims) == dims


def test_profile_shapes_from_the_repository_manifest(tmp_path):
    """The contract with export/repository.py: its manifest gives the expected profiles."""
    repository = pytest.importorskip("export.repository")  # imports torch
    from glipv2.config import get_preset

    cfg = get_preset("tiny")
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    m = repository.manifest_of(cfg, ckpt, {}, "gpu", top_k=100, max_batch_size=8)
    h, w = cfg.image_hw
    det = ets.profile_shapes(m, "detector")
    assert det["images"] == ((1, 3, h, w), (4, 3, h, w), (8, 3, h, w))
    assert det["token_features"] == ((1, 1, cfg.text_dim), (4, 64, cfg.text_dim), (8, 256, cfg.text_dim))
    assert ets.profile_shapes(m, "text_encoder")["input_ids"] == ((1, 1), (4, 64), (8, 256))


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(max_batch_size=0), "max_batch_size"),
    (lambda m: m.pop("max_batch_size"), "max_batch_size"),
    (lambda m: m["models"]["detector"].update(max_batch_size=0), "max_batch_size"),
    (lambda m: m["models"]["detector"]["inputs"]["images"].update(dims=[3, 0, 64]), "bad dim"),
    (lambda m: m["models"].pop("detector"), "not in the manifest"),
])
def test_profile_shapes_reject_bad_manifests(change, match):
    """Refused when the manifest is read (glipv2.runtime.manifest) or when its shapes are."""
    m = sample_manifest()
    change(m)
    with pytest.raises(ValueError, match=match):
        ets.profile_shapes(Manifest.from_dict(m), "detector")


def test_tensorrt_version_must_be_10():
    ets.check_tensorrt_version("10.5.0")
    ets.check_tensorrt_version("10.16.1.11", triton_tag=None)  # the runner: any 10.x
    for version in ("11.4.0.106", "8.6.1"):
        with pytest.raises(ets.TensorRTUnavailable, match="10.x"):
            ets.check_tensorrt_version(version)


def test_tensorrt_version_must_match_the_triton_release():
    """Plans load only into the TensorRT that built them: tritonserver:24.10 runs 10.5, so
    the newest 10.x (what an unpinned pip install brings) is refused, with the pinned fix."""
    ets.check_tensorrt_version("10.5.0.18")
    for version in ("10.16.1.11", "10.4.0", "10.50.1"):
        with pytest.raises(ets.TensorRTUnavailable, match="loads only plans built by TensorRT 10.5") as err:
            ets.check_tensorrt_version(version)
        assert "tensorrt-cu12==10.5.*" in str(err.value) and "tensorrt:24.10-py3" in str(err.value)
    ets.check_tensorrt_version("10.7.0", triton_tag="24.12")
    with pytest.raises(ValueError, match="unknown Triton release"):
        ets.check_tensorrt_version("10.5.0", triton_tag="23.01")
    assert ets.CONTAINER == f"nvcr.io/nvidia/tensorrt:{ets.TRITON_TAG}-py3"
    assert ets.tensorrt_pip_pin() == "tensorrt-cu12==10.5.*"
    # the hint for this CPU machine names the pinned container and python3
    hint = ets._container_hint("model_repository-gpu")
    assert ets.CONTAINER in hint and "python3 -m export.tensorrt" in hint and "python -m" not in hint


def test_tensorrt_of_another_release_is_refused_by_the_cli(fake_trt, tmp_path, monkeypatch, capsys):
    repo = fake_repository(tmp_path / "repo")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.16.1.11"))
    monkeypatch.setattr(ets, "cuda_device_count", lambda: 1)
    assert ets.main(["--repository", str(repo), "--no-verify"]) == ets.EXIT_ENVIRONMENT
    assert "TensorRT 10.5" in capsys.readouterr().err
    assert not (repo / "detector" / "1" / "model.plan").exists()
    monkeypatch.setenv(ets.TRITON_TAG_ENV, "24.12")  # compose passes its TRITON_TAG
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.7.0"))
    assert ets.main(["--repository", str(repo), "--no-verify", "--timing-cache", ""]) == 0
    record = json.loads((repo / "manifest.json").read_text())["engines"]
    assert record["tensorrt_version"] == "10.7.0" and record["triton_tag"] == "24.12"


def test_engine_record_and_skip(fake_trt, tmp_path, monkeypatch, capsys):
    """The builder writes TensorRT version, GPU and checkpoint into the manifest and skips
    the build while they still match; a new checkpoint, GPU or TensorRT rebuilds."""
    repo = fake_repository(tmp_path / "repo")
    monkeypatch.setattr(ets, "environment_problems", lambda tag=None: [])
    monkeypatch.setattr(ets, "cuda_device_name", lambda device=0: "NVIDIA A10G")
    args = ["--repository", str(repo), "--no-verify", "--timing-cache", ""]
    assert ets.main(args) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "NVIDIA A10G" in out
    manifest = Manifest.load(repo)
    record = manifest.engines
    assert record == ets.engine_record(manifest, "10.5.0", "NVIDIA A10G", "fp16", "24.10")
    assert record["gpu"] == "NVIDIA A10G" and record["tensorrt_version"] == "10.5.0"
    assert ets.plans_are_current(repo, manifest, record)

    plan = repo / "detector" / "1" / "model.plan"
    built = plan.stat().st_mtime_ns
    assert ets.main(args) == 0
    assert "nothing to build" in capsys.readouterr().out and plan.stat().st_mtime_ns == built
    monkeypatch.setattr(ets, "cuda_device_name", lambda device=0: "NVIDIA L4")  # another GPU model
    assert ets.main(args) == 0
    assert "built in" in capsys.readouterr().out
    assert json.loads((repo / "manifest.json").read_text())["engines"]["gpu"] == "NVIDIA L4"
    manifest = json.loads((repo / "manifest.json").read_text())
    manifest["checkpoint"]["sha256"] = "another checkpoint"
    (repo / "manifest.json").write_text(json.dumps(manifest))
    assert ets.main(args) == 0
    assert "built in" in capsys.readouterr().out
    assert ets.main([*args, "--rebuild"]) == 0
    assert "built in" in capsys.readouterr().out
    plan.unlink()  # a plan gone missing
    assert not ets.plans_are_current(repo, Manifest.load(repo), record)


def test_atomic_write(tmp_path):
    target = tmp_path / "sub" / "model.plan"
    ets._atomic_write(target, b"abc")
    ets._atomic_write(target, memoryview(b"abcd"))
    assert target.read_bytes() == b"abcd"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in target.parent.iterdir()] == ["model.plan"]


# ----------------------------------------------------------------------------- CLI


def test_cli_missing_manifest_exits_2(tmp_path, capsys):
    assert ets.main(["--repository", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "manifest.json") in err


def test_cli_missing_onnx_exits_2(tmp_path, capsys):
    repo = write_repository(tmp_path / "repo", sample_manifest())
    (repo / "detector" / "1" / "model.onnx").unlink()
    assert ets.main(["--repository", str(repo)]) == 2
    assert str(repo / "detector" / "1" / "model.onnx") in capsys.readouterr().err


def test_cli_invalid_manifest_exits_2(tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "manifest.json").write_text("{not json")
    assert ets.main(["--repository", str(repo)]) == 2
    assert "invalid manifest" in capsys.readouterr().err


@pytest.mark.skipif(not ets.environment_problems(), reason="this machine has tensorrt 10.x and a CUDA GPU")
def test_cli_without_tensorrt_or_gpu_exits_3_with_one_line(tmp_path):
    repo = write_repository(tmp_path / "model_repository", sample_manifest())
    proc = subprocess.run([sys.executable, "-m", "export.tensorrt", "--repository", str(repo)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    line = lines[0]
    assert "tensorrt" in line.lower()
    assert "docker run --gpus all -v $PWD:/w -w /w nvcr.io/nvidia/tensorrt:24.10-py3" in line
    assert f"python3 -m export.tensorrt --repository {repo}" in line
    assert "pip install" in line  # the container lacks the parity check's packages
    assert not (repo / "text_encoder" / "1" / "model.plan").exists()


def test_container_hint_uses_a_path_inside_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hint = ets._container_hint(str(tmp_path / "model_repository"), verify=False)
    assert hint == ("docker run --gpus all -v $PWD:/w -w /w nvcr.io/nvidia/tensorrt:24.10-py3 "
                    "python3 -m export.tensorrt --repository model_repository")


def test_manifest_tokenizer(tmp_path):
    m = sample()
    assert ets.manifest_tokenizer(tmp_path, m) is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert ets.manifest_tokenizer(tmp_path, m) == tmp_path / "tokenizer.json"
    assert ets.parity_problems(tmp_path / "tokenizer.json") == []


def test_import_is_light():
    """Importing the module must not import tensorrt, torch or onnxruntime (they are lazy)."""
    code = ("import sys, export.tensorrt; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- parity logic


def dets(boxes, scores, phrases) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(phrases, np.int64))


def test_compare_detections():
    ref = dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.5, 0.21], [0, 1, 0])
    same = ets.compare_detections(ref, ref)
    assert same.ok and same.matched == 3 and same.max_score_diff == 0.0

    fp16 = dets(ref.boxes + 0.2, ref.scores - 0.01, ref.phrase_ids)
    assert ets.compare_detections(ref, fp16).ok

    # the borderline detection (0.21, near min_score 0.2) may vanish; a confident one may not
    assert ets.compare_detections(ref, dets(ref.boxes[:2], ref.scores[:2], ref.phrase_ids[:2])).ok
    lost = ets.compare_detections(ref, dets(ref.boxes[1:], ref.scores[1:], ref.phrase_ids[1:]))
    assert not lost.ok and lost.missing == 1 and lost.extra == 0

    wrong_phrase = ets.compare_detections(ref, dets(ref.boxes, ref.scores, [0, 2, 0]))
    assert not wrong_phrase.ok and (wrong_phrase.missing, wrong_phrase.extra) == (1, 1)
    moved = ets.compare_detections(ref, dets(ref.boxes + [5, 0, 5, 0], ref.scores, ref.phrase_ids))
    assert not moved.ok
    rescored = ets.compare_detections(ref, dets(ref.boxes, [0.9, 0.4, 0.21], ref.phrase_ids))
    assert not rescored.ok
    empty = Detections.empty()
    assert ets.compare_detections(empty, empty).ok
    assert not ets.compare_detections(ref, empty).ok


class FakeEngine:
    """Two anchors that match every real token (scores ~0.98 and ~0.85), the rest nothing."""

    def __init__(self, drop_second=False, noise=0.0):
        self.drop_second, self.noise = drop_second, noise

    def __call__(self, images, input_ids, attention_mask):
        b, t = input_ids.shape
        k = 6
        boxes = np.tile(np.array([[10, 10, 50, 50], [60, 60, 120, 110]] + [[0, 0, 4, 4]] * (k - 2), np.float32), (b, 1, 1))
        logits = np.full((b, k, t), -10.0, np.float32)
        logits[:, 0] = np.where(attention_mask > 0, 4.0, -10.0)
        if not self.drop_second:
            logits[:, 1] = np.where(attention_mask > 0, 1.0, -10.0)
        ctr = np.full((b, k), 4.0, np.float32)
        rng = np.random.default_rng(0)
        return (boxes + self.noise * rng.standard_normal(boxes.shape).astype(np.float32),
                logits + self.noise * rng.standard_normal(logits.shape).astype(np.float32), ctr)


def test_parity_with_fake_engines(tokenizer):
    images, prompts = ets.sample_inputs(3, seed=1)
    assert all(im.dtype == np.uint8 and im.ndim == 3 for im in images)
    assert len({len(p.text) for p in prompts}) > 1  # prompts of different lengths
    ok = ets.parity(FakeEngine(), FakeEngine(noise=1e-3), (128, 128), images, prompts, batch_size=2,
                    tokenizer=tokenizer)
    assert ok.ok, ok.summary()
    assert ok.reference_detections == ok.matched == 2 * sum(len(p.phrases) for p in prompts)
    assert ok.feature_max_abs_diff is None
    bad = ets.parity(FakeEngine(), FakeEngine(drop_second=True), (128, 128), images, prompts, batch_size=2,
                     tokenizer=tokenizer)
    assert not bad.ok and bad.missing == sum(len(p.phrases) for p in prompts)
    assert "FAILED" in bad.summary()


def test_model_file_layouts(tmp_path):
    assert model_file(tmp_path, "detector", "onnx") == tmp_path / "detector" / "1" / "model.onnx"
    (tmp_path / "detector.onnx").write_bytes(b"")
    assert model_file(tmp_path, "detector", "onnx") == tmp_path / "detector.onnx"


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(bool(ets.environment_problems()), reason="needs tensorrt and a CUDA GPU")
def test_build_engines_and_parity(tmp_path, small_cfg, small_model):
    """Exports the small model, builds fp16 engines through the CLI, reuses the timing
    cache, and checks detections and token features against ONNX Runtime."""
    from export.onnx_export import export_onnx

    flat = export_onnx(small_model, tmp_path / "onnx", top_k=50)
    manifest = sample_manifest(image_hw=small_cfg.image_hw, text_dim=small_cfg.text_dim, top_k=50, max_batch_size=4)
    repo = write_repository(tmp_path / "repo", manifest, onnx=False)
    for model, path in (("text_encoder", flat.text_encoder), ("detector", flat.detector)):
        (repo / model / "1").mkdir(parents=True)
        os.replace(path, repo / model / "1" / "model.onnx")
    cache = tmp_path / "cache" / "trt_timing.cache"

    assert ets.main(["--repository", str(repo), "--timing-cache", str(cache), "--parity-images", "4"]) == 0
    for model in manifest["models"]:
        assert (repo / model / "1" / "model.plan").stat().st_size > 0
    assert cache.stat().st_size > 0

    again = ets.build_engine(repo / "detector" / "1" / "model.onnx", tmp_path / "detector.plan",
                             ets.profile_shapes(Manifest.load(repo), "detector"), timing_cache=cache)
    assert again.timing_cache_loaded and again.precision == "fp16" and again.plan_bytes > 0

    report = ets.verify_engine(repo, repo, Manifest.load(repo), num_images=4)
    assert report.ok, report.summary()
    assert report.feature_max_abs_diff is not None and report.feature_max_abs_diff < 5e-2


# ----------------------------------------------------------------------------- fakes
# A stand-in for the tensorrt module and for device memory. It checks OUR glue code
# (API calls in the right order, profiles, timing cache, atomic writes, the runner's
# buffers and shapes, the CLI flow) on a CPU machine; it says nothing about TensorRT itself.


class FakeMemory:
    def __init__(self):
        self.blocks, self.next = {}, 0x1000

    def alloc(self, nbytes):
        self.next += 0x1000
        self.blocks[self.next] = bytearray(nbytes)
        return self.next


class FakeCuda:
    memory = FakeMemory()

    def __init__(self, device=0):
        self.closed = False

    def make_current(self):
        pass

    def alloc(self, nbytes):
        return self.memory.alloc(max(int(nbytes), 1))

    def free(self, ptr):
        del self.memory.blocks[ptr]

    def to_device(self, ptr, array):
        self.memory.blocks[ptr][:array.nbytes] = array.tobytes()

    def to_host(self, array, ptr):
        array[...] = np.frombuffer(bytes(self.memory.blocks[ptr][:array.nbytes]), array.dtype).reshape(array.shape)

    stream_handle = 0

    def synchronize(self):
        pass

    def close(self):
        self.closed = True


FAKE_DIM = 4
FAKE_SIGNATURES = {  # name -> (mode, dtype); inputs first, as TensorRT lists them
    "text_encoder": {"input_ids": ("in", "INT64"), "attention_mask": ("in", "INT64"),
                     "token_features": ("out", "FLOAT")},
    "detector": {"images": ("in", "UINT8"), "token_features": ("in", "FLOAT"), "attention_mask": ("in", "INT64"),
                 "boxes": ("out", "FLOAT"), "logits": ("out", "FLOAT"), "centerness": ("out", "FLOAT")},
}


def fake_tensorrt(version="10.5.0"):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT32 INT64 INT8 UINT8 BOOL")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16")

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class Network:
        def __init__(self):
            self.inputs = []

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            spec = json.loads(Path(path).read_text())
            if "error" in spec:
                self.errors = [spec["error"]]
                return False
            self.network.model = spec["model"]
            self.network.inputs = [n for n, (mode, _) in FAKE_SIGNATURES[spec["model"]].items() if mode == "in"]
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data or b"timings"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool, self.cache = set(), [], None, None

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data == b"from another gpu":
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
            self[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            assert flags == 0
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert config.cache is not None and len(config.profiles) == 1
            assert set(config.profiles[0]) == set(network.inputs)
            return json.dumps({"model": network.model, "fp16": trt.BuilderFlag.FP16 in config.flags,
                               "profile": config.profiles[0]}).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.spec["profile"][name]
            self.shapes[name] = tuple(shape)
            return all(a <= s <= b for a, s, b in zip(lo, shape, hi)) and len(shape) == len(lo)

        def get_tensor_shape(self, name):
            if self.engine.model == "text_encoder":
                b, t = self.shapes["input_ids"]
                return (b, t, FAKE_DIM)
            b, t = self.shapes["attention_mask"]
            return {"boxes": (b, 6, 4), "logits": (b, 6, t), "centerness": (b, 6)}[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def _read(self, name, dtype):
            return np.frombuffer(bytes(FakeCuda.memory.blocks[self.addresses[name]]), dtype).reshape(self.shapes[name])

        def _write(self, name, array):
            FakeCuda.memory.blocks[self.addresses[name]][:array.nbytes] = np.ascontiguousarray(array, np.float32).tobytes()

        def execute_async_v3(self, stream):
            if self.engine.model == "text_encoder":
                ids = self._read("input_ids", np.int64)
                self._write("token_features", np.repeat(ids[..., None].astype(np.float32), FAKE_DIM, -1))
            else:
                mask = self._read("attention_mask", np.int64)
                images = self._read("images", np.uint8)
                outs = FakeEngine()(images, mask, mask)
                for name, value in zip(("boxes", "logits", "centerness"), outs):
                    self._write(name, value)
            return True

    class Engine:
        def __init__(self, data):
            self.spec = json.loads(data)
            self.model = self.spec["model"]
            self.names = list(FAKE_SIGNATURES[self.model])

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if FAKE_SIGNATURES[self.model][name][0] == "in" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType[FAKE_SIGNATURES[self.model][name][1]]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(data)

    trt.ILogger, trt.OnnxParser, trt.Builder, trt.Runtime = ILogger, OnnxParser, Builder, Runtime
    return trt


@pytest.fixture()
def fake_trt(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(ets, "_Cuda", FakeCuda)
    return trt


def fake_repository(root: Path) -> Path:
    manifest = sample_manifest(image_hw=(128, 128), text_dim=FAKE_DIM, top_k=6, max_batch_size=4)
    write_repository(root, manifest, onnx=False)
    for model in manifest["models"]:
        (root / model / "1").mkdir(parents=True, exist_ok=True)
        (root / model / "1" / "model.onnx").write_text(json.dumps({"model": model}))
    return root


def test_build_engine_glue_with_fake_tensorrt(fake_trt, tmp_path):
    repo = fake_repository(tmp_path / "repo")
    manifest = Manifest.load(repo)
    onnx = repo / "detector" / "1" / "model.onnx"
    shapes = ets.profile_shapes(manifest, "detector")
    cache = tmp_path / "cache" / "timing.cache"

    first = ets.build_engine(onnx, tmp_path / "a.plan", shapes, timing_cache=cache)
    assert first.precision == "fp16" and not first.timing_cache_loaded and first.tensorrt_version == "10.5.0"
    spec = json.loads((tmp_path / "a.plan").read_text())
    assert spec["fp16"] and {k: tuple(map(tuple, v)) for k, v in spec["profile"].items()} == shapes
    assert first.plan_bytes == (tmp_path / "a.plan").stat().st_size and cache.read_bytes() == b"timings"
    assert ets.build_engine(onnx, tmp_path / "b.plan", shapes, timing_cache=cache).timing_cache_loaded
    cache.write_bytes(b"from another gpu")
    third = ets.build_engine(onnx, tmp_path / "c.plan", shapes, fp16=False, timing_cache=cache)
    assert third.precision == "fp32" and not third.timing_cache_loaded and "timing cache" in third.notes[0]
    assert not json.loads((tmp_path / "c.plan").read_text())["fp16"]

    with pytest.raises(ValueError, match="network inputs"):
        ets.build_engine(onnx, tmp_path / "d.plan", ets.profile_shapes(manifest, "text_encoder"))
    bad = tmp_path / "bad.onnx"
    bad.write_text(json.dumps({"error": "In node 3 (DeformConv): UNSUPPORTED_NODE"}))
    with pytest.raises(ets.OnnxParseError, match="UNSUPPORTED_NODE"):
        ets.build_engine(bad, tmp_path / "e.plan", shapes)
    assert not (tmp_path / "e.plan").exists()


def test_tensorrt_11_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106"))
    with pytest.raises(ets.TensorRTUnavailable, match="needs TensorRT 10.x"):
        ets.build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {})


def test_runner_and_cli_glue_with_fakes(fake_trt, tmp_path, monkeypatch, capsys, tokenizer):
    repo = fake_repository(tmp_path / "repo")

    class Reference(FakeEngine):
        def encode_text(self, ids, mask):
            return np.repeat(ids[..., None].astype(np.float32), FAKE_DIM, -1)

    monkeypatch.setattr(ets, "environment_problems", lambda tag=None: [])
    monkeypatch.setattr(ets, "_reference_engine", lambda onnx_dir: Reference())
    (repo / "tokenizer.json").write_bytes(tokenizer.path.read_bytes())
    assert ets.main(["--repository", str(repo), "--timing-cache", str(tmp_path / "t.cache")]) == 0
    out = capsys.readouterr().out
    assert "text_encoder:" in out and "detector:" in out and "fp16" in out
    assert "parity vs ONNX Runtime: OK" in out and "token features max |diff| 0.00e+00" in out
    for model in ("text_encoder", "detector"):
        assert (repo / model / "1" / "model.plan").is_file()
    assert FakeCuda.memory.blocks == {}  # every device buffer was freed

    class Different(Reference):
        def __init__(self):
            super().__init__(drop_second=True)

    monkeypatch.setattr(ets, "_reference_engine", lambda onnx_dir: Different())
    assert ets.main(["--repository", str(repo), "--timing-cache", ""]) == 1  # plans current: parity runs anyway
    out = capsys.readouterr().out
    assert "nothing to build" in out and "parity vs ONNX Runtime: FAILED" in out
