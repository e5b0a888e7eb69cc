"""What a GPU host would hit, tested where a CPU can test it: which device ONNX Runtime
really runs the embedded backend on (and the refusal to start when CUDA was asked for and
is not used), the exclusive ONNX Runtime extras, and the TensorRT parity of answers and
captions (its comparison, with real ONNX Runtime engines standing on both sides).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from export import tensorrt as ets
from glipv2.runtime.onnx import CPU, CUDA, DeviceError, OrtEngine, installed_ort_distributions, requested_providers, session
from service.app import create_app
from service.backends.embedded import EmbeddedBackend
from glipv2.runtime.manifest import Manifest
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"
MODELS = ("text_encoder", "detector", "vqa", "caption_start", "caption_step")
needs_repo = pytest.mark.skipif(not all((REPO / m / "1" / "model.onnx").is_file() for m in MODELS),
                                reason="model_repository has no ONNX files: run `make export`")
HAS_CUDA = CUDA in ort.get_available_providers()


# --------------------------------------------------------------------------- device


def test_requested_providers():
    assert requested_providers("cpu", [CUDA, CPU]) == [CPU]
    assert requested_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert requested_providers("auto", [CPU]) == [CPU]
    assert requested_providers("cuda", ["TensorrtExecutionProvider", CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(DeviceError, match="no CUDA provider"):
        requested_providers("cuda", [CPU])
    with pytest.raises(ValueError, match="device"):
        requested_providers("gpu", [CPU])


@needs_repo
@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has a CUDA provider (the GPU host's check is make gpu-check)")
def test_cuda_asked_without_cuda_refuses(caplog):
    """device 'cuda' on a machine whose ONNX Runtime cannot use CUDA: a clear error, not a
    silent CPU run."""
    with pytest.raises(DeviceError, match="device 'cuda' asked for") as err:
        session(REPO / "text_encoder" / "1" / "model.onnx", device="cuda")
    assert "onnxruntime-gpu" in str(err.value)
    with pytest.raises(DeviceError):
        EmbeddedBackend(REPO, device="cuda")


@needs_repo
def test_the_backend_reports_the_sessions_own_device(caplog):
    """'auto' takes CUDA only when the sessions really run on it, and says which at
    start-up and in /v1/models (here: a CPU-only machine, so cpu)."""
    caplog.set_level("INFO", logger="service")
    backend = EmbeddedBackend(REPO, threads=1)
    expected = "cuda" if HAS_CUDA else "cpu"
    assert backend.device == expected
    assert backend.providers == backend.engine.text.get_providers()
    assert any(f"runs the models on {expected}" in r.getMessage() for r in caplog.records)
    with TestClient(create_app(Settings(repository=REPO, threads=1), backend=backend)) as client:
        body = client.get("/v1/models").json()
    assert body["device"] == expected and body["providers"] == backend.providers
    cpu = EmbeddedBackend(REPO, threads=1, device="cpu")
    assert cpu.device == "cpu" and cpu.providers == [CPU]
    assert all(s.get_providers() == [CPU] for s in cpu.engine.sessions())


@needs_repo
@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has a CUDA provider")
def test_the_gateway_refuses_to_start_when_cuda_is_not_used(tmp_path):
    """`python -m service` with GLIPV2_DEVICE=cuda on a machine without CUDA exits with an
    error naming the cause instead of serving from the CPU."""
    env = {**os.environ, "GLIPV2_REPOSITORY": str(REPO), "GLIPV2_DEVICE": "cuda", "GLIPV2_PORT": "1",
           "GLIPV2_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "device 'cuda' asked for" in proc.stderr and "Application startup failed" in proc.stderr


def test_onnxruntime_extras_are_exclusive():
    """onnxruntime and onnxruntime-gpu overwrite the same module: each comes from exactly
    one extra (cpu / gpu), and no other extra pulls either in."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def holders(dist: str) -> set[str]:
        return {name for name, reqs in extras.items()
                if any(r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() == dist for r in reqs)}

    assert holders("onnxruntime") == {"cpu"}
    assert holders("onnxruntime-gpu") == {"gpu"}
    makefile = (ROOT / "Makefile").read_text()
    assert '".[train,export,serve,cpu,dev]"' in makefile
    assert installed_ort_distributions() == (["onnxruntime-gpu"] if HAS_CUDA else ["onnxruntime"])


# --------------------------------------------------------------------------- TensorRT parity: answers and captions


class _Perturbed:
    """An engine like the one under check, with a defect put in on purpose."""

    def __init__(self, engine: OrtEngine, swap_answers: bool = False, caption_bias: int | None = None) -> None:
        self.engine, self.swap_answers, self.caption_bias = engine, swap_answers, caption_bias
        self.captioner = self if caption_bias is not None else engine.captioner

    def answer(self, images, ids, mask):
        logits = self.engine.answer(images, ids, mask)
        return logits[:, ::-1].copy() if self.swap_answers else logits

    def start(self, images):
        out = list(self.engine.captioner.start(images))
        out[0] = out[0].copy()
        out[0][:, self.caption_bias] += 50.0  # this token always wins the first step
        return tuple(out)

    def step(self, *args):
        return self.engine.captioner.step(*args)


@pytest.fixture(scope="module")
def parity_setup():
    if not all((REPO / m / "1" / "model.onnx").is_file() for m in MODELS):
        pytest.skip("model_repository has no ONNX files: run `make export`")
    from glipv2.text import Tokenizer

    manifest = Manifest.load(REPO)
    tokenizer = Tokenizer(REPO / manifest.tokenizer)
    images, _ = ets.sample_inputs(3, seed=1)
    return OrtEngine(REPO, threads=1), manifest, tokenizer, images


def test_understanding_parity_of_equal_engines(parity_setup):
    engine, manifest, tokenizer, images = parity_setup
    report = ets.understanding_parity(engine, OrtEngine(REPO, threads=1), manifest, images, tokenizer=tokenizer,
                                      beam_sizes=(1, 2))
    assert report.ok, report.summary()
    assert report.answers == len(ets.QUESTIONS) * len(images) and report.captions == 2 * len(images)
    assert report.max_answer_score_diff < 1e-5


def test_understanding_parity_finds_wrong_answers_and_captions(parity_setup):
    engine, manifest, tokenizer, images = parity_setup
    wrong_answers = ets.understanding_parity(engine, _Perturbed(engine, swap_answers=True), manifest, images,
                                             tokenizer=tokenizer, beam_sizes=(1,))
    assert not wrong_answers.ok and wrong_answers.answer_mismatches and not wrong_answers.caption_mismatches
    # a caption that starts with another word than the reference's
    ref_first = int(np.argmax(engine.captioner.start(np.zeros((1, 3, *manifest.image_hw), np.uint8))[0]))
    other = (ref_first + 1) % len(manifest.caption.tokens)
    wrong_captions = ets.understanding_parity(engine, _Perturbed(engine, caption_bias=other), manifest, images,
                                              tokenizer=tokenizer, beam_sizes=(1,))
    assert not wrong_captions.ok and len(wrong_captions.caption_mismatches) == len(images)
    assert not wrong_captions.answer_mismatches
    report = ets.ParityReport(images=3, reference_detections=1, candidate_detections=1, matched=1, missing=0,
                              extra=0, max_score_diff=0.0, min_iou=1.0, understanding=wrong_captions)
    assert not report.ok and "captions 3 (3 mismatched)" in report.summary()


# --------------------------------------------------------------------------- make gpu-check


@needs_repo
@pytest.mark.skipif(ets.cuda_device_count() > 0, reason="a GPU is here: run `make gpu-check` itself")
def test_gpu_check_without_a_gpu(tmp_path, capsys):
    """The GPU host's first script: on a machine without a GPU it says so (exit 3); its
    CPU halves run (--cpu-dry-run) and write their figures."""
    from bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == gpu_check.EXIT_NO_GPU
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert gpu_check.main(["--cpu-dry-run", "--skip-triton", "--rounds", "2", "--out", str(tmp_path / "r.json")]) == 0
    result = __import__("json").loads((tmp_path / "r.json").read_text())
    assert result["dry_run"] and result["embedded"]["cpu"]["device"] == "cpu"
    assert result["embedded"]["cpu"]["batch8_ms"] > result["embedded"]["cpu"]["batch1_ms"] > 0
