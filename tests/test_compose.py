"""compose.yaml and docker/: the GPU profile checked against the code (it cannot run on
a machine without a GPU), and the cpu profile brought up for real (`make compose-test`).

- Static (default run, fast): every path, port, environment variable and command that
  compose.yaml and the Dockerfiles name exists and agrees with the code; `docker-compose
  config` accepts the file (skipped, with the reason, where docker-compose is missing).
- `make compose-test` (marked slow and compose): builds the gateway and cpu-flavour Triton
  images on a debootstrapped Debian base with a Docker engine of its own (tests/docker_env.py),
  runs `docker-compose --profile cpu up`, waits for health, sends /v1/detect, /v1/vqa and
  /v1/caption to the gateway container, which calls the Triton container over the compose
  network, compares the answers with the embedded backend in this process, then `down`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from export import build as export_build
from export import local_triton, repository
from export import tensorrt as ets
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKER = ROOT / "docker"
REPO = ROOT / "model_repository"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _expand(value: str) -> str:
    """${VAR:-default} -> default (the values a fresh clone runs with)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def _services() -> dict:
    return {name: {k: (v if not isinstance(v, str) else _expand(v)) for k, v in svc.items()}
            for name, svc in _compose()["services"].items()}


def _command(svc: dict) -> list[str]:
    return [_expand(c) for c in svc["command"]]


def _env(svc: dict) -> dict[str, str]:
    return {k: _expand(v) for k, v in (svc.get("environment") or {}).items()}


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> source (volume name or host path), ':ro' dropped."""
    out = {}
    for m in svc.get("volumes") or []:
        source, target = _expand(m).split(":")[:2]
        out[target] = source
    return out


def _dockerfile(svc: dict) -> Path:
    return ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --------------------------------------------------------------------------- static checks


def test_profiles_and_the_default_path():
    services = _services()
    gpu = {n for n, s in services.items() if s.get("profiles") == ["gpu"]}
    cpu = {n for n, s in services.items() if s.get("profiles") == ["cpu"]}
    assert gpu == {"exporter", "engine-builder", "triton", "gateway"}
    assert cpu == {"triton-cpu", "gateway-cpu"}
    assert set(services) == gpu | cpu  # every service is in exactly one profile
    assert "COMPOSE_PROFILES=gpu" in (ROOT / ".env").read_text().splitlines()  # `docker compose up` = GPU path
    # exporter -> engine builder -> Triton (healthy) -> gateway
    assert services["engine-builder"]["depends_on"] == {"exporter": {"condition": "service_completed_successfully"}}
    assert services["triton"]["depends_on"] == {"engine-builder": {"condition": "service_completed_successfully"}}
    assert services["gateway"]["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert services["gateway-cpu"]["depends_on"] == {"triton-cpu": {"condition": "service_healthy"}}
    for name in ("engine-builder", "triton"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("triton", "triton-cpu"):
        svc = services[name]
        assert svc["shm_size"] == "1g" and "/v2/health/ready" in " ".join(svc["healthcheck"]["test"])
    # pinned host memory for the GPU; not on the cpu profile, whose hosts (containers in
    # containers, rootless engines) may not raise RLIMIT_MEMLOCK: runc then refuses to start
    assert services["triton"]["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert "ulimits" not in services["triton-cpu"]


def test_the_gpu_path_agrees_with_the_code():
    services = _services()
    exporter, builder, triton, gateway = (services[n] for n in ("exporter", "engine-builder", "triton", "gateway"))
    # the exporter's command is a valid export.build command line, rendering the gpu flavour
    args = export_build.parse_args(_command(exporter))
    assert args.flavour == "gpu" and args.if_changed and args.top_k == 100 and args.max_batch_size == 8
    out = str(args.out)
    checkpoint_dir = _mounts(exporter)["/checkpoints"]
    assert (ROOT / checkpoint_dir / args.checkpoint.name).is_file()  # ./demo/tiny.pt
    assert str(args.checkpoint.parent) == "/checkpoints"
    models_mount = next(t for t, s in _mounts(exporter).items() if s == "models")
    # renders into a folder BELOW the volume: the render swaps folders by renaming, and a
    # mount point cannot be renamed
    assert Path(out).parent == Path(models_mount)
    # the engine builder builds that folder with the Triton release's TensorRT
    b_args = ets.build_parser().parse_args(_command(builder))
    assert b_args.repository == out
    assert _env(builder)["GLIPV2_TRITON_TAG"] == ets.TRITON_TAG
    assert builder["build"]["args"]["TRITON_TAG"] == "${TRITON_TAG:-%s}" % ets.TRITON_TAG
    assert Path(b_args.timing_cache).parent.as_posix() in _mounts(builder)
    assert _mounts(builder)[Path(b_args.timing_cache).parent.as_posix()] == "trt-cache"
    # Triton: the image of the same release, the same folder, exit on error
    assert triton["image"] == f"nvcr.io/nvidia/tritonserver:{ets.TRITON_TAG}-py3"
    cmd = _command(triton)
    flags = dict(c.split("=", 1) for c in cmd[1:])
    assert cmd[0] == "tritonserver" and flags["--model-repository"] == out
    assert flags["--exit-on-error"] == "true" and flags["--strict-readiness"] == "true"
    assert _mounts(triton)[models_mount] == "models"
    assert _mounts(triton)[repository.TRT_CACHE_DIR] == "ort-trt-cache"  # gpu-onnx engines survive restarts
    # the gateway: every variable is a setting, and they point at Triton's ports and folder
    env = _env(gateway)
    fields = {f"GLIPV2_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = Settings(**{k.removeprefix("GLIPV2_").lower(): v for k, v in env.items()})
    assert settings.backend == "triton" and settings.host == "0.0.0.0"
    assert settings.triton_url == f"triton:{flags['--grpc-port']}"
    assert settings.triton_http_url == f"triton:{flags['--http-port']}"
    assert str(settings.repository) == out and _mounts(gateway)[models_mount] == "models"
    assert [_expand(p) for p in gateway["ports"]] == [f"8000:{settings.port}"]
    assert set(_compose()["volumes"]) == {"models", "trt-cache", "ort-trt-cache"}


def test_the_cpu_path_agrees_with_the_code():
    services = _services()
    triton, gateway = services["triton-cpu"], services["gateway-cpu"]
    cmd = _command(triton)
    assert cmd[:3] == ["python3", "-m", "export.local_triton"]
    args = local_triton.build_parser().parse_args(cmd[3:])
    assert args.cmd == "serve" and args.host == "0.0.0.0"
    assert _mounts(triton)[str(args.repository)] == "./model_repository"  # what `make export` renders
    env = _env(gateway)
    settings = Settings(**{k.removeprefix("GLIPV2_").lower(): v for k, v in env.items()})
    assert settings.backend == "triton" and settings.host == "0.0.0.0"
    assert settings.triton_url == f"triton-cpu:{args.grpc_port}"
    assert settings.triton_http_url == f"triton-cpu:{args.http_port}"
    assert _mounts(gateway)[str(settings.repository)] == "./model_repository"
    assert json.loads((REPO / "manifest.json").read_text())["flavour"] == "cpu"


def test_dockerfiles_copy_what_exists_and_run_python3():
    services = _services()
    files = {_dockerfile(s) for s in services.values() if "build" in s}
    assert files == {DOCKER / f"{n}.Dockerfile" for n in ("gateway", "exporter", "engine-builder", "triton-cpu")}
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in files:
        steps = _instructions(path)
        for word, rest in steps:
            if word == "COPY" and "--from=" not in rest:
                *sources, _ = shlex.split(rest)
                for src in sources:
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
                    assert src.split("/")[0] not in ignored, f"{path.name}: COPY {src} is in .dockerignore"
            if word in ("CMD", "ENTRYPOINT") and rest.startswith("["):
                argv = json.loads(rest)
                if argv[0].startswith("python"):
                    assert argv[0] == "python3", f"{path.name}: {word} {argv}"
        run_lines = " ".join(rest for word, rest in steps if word == "RUN")
        assert not re.search(r"(^|[\s;&])python\s", run_lines), f"{path.name} runs `python`, not python3"
        assert "pip_cert" not in " ".join(rest for w, rest in steps if w in ("COPY", "ADD", "ENV"))
    for name in ("demo", "model_repository", ".venv", ".cache", ".git"):
        assert name in ignored  # checkpoints, repositories and caches are mounted, never baked in
    gateway = _instructions(DOCKER / "gateway.Dockerfile")
    assert sum(w == "FROM" for w, _ in gateway) == 2  # multi-stage: pip and build tools stay behind
    assert any(w == "USER" and r != "root" for w, r in gateway)
    assert any(w == "HEALTHCHECK" and "/health/ready" in r for w, r in gateway)
    assert any(w == "ENV" and "GLIPV2_HOST=0.0.0.0" in r for w, r in gateway)
    assert '"/src[serve,cpu]"' in " ".join(r for w, r in gateway)
    builder = (DOCKER / "engine-builder.Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tensorrt:${TRITON_TAG}-py3" in builder
    assert f"ARG TRITON_TAG={ets.TRITON_TAG}" in builder
    for module in ("pillow", "tokenizers", "onnxruntime"):  # the parity check's packages, baked in
        assert module in builder
    # the python modules the images run exist
    for module in ("service", "export.build", "export.tensorrt", "export.local_triton"):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file() or (ROOT / module / "__main__.py").is_file()


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (`make compose-test` installs it)")
@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_config_accepts_the_file(profile, tmp_path):
    proc = subprocess.run(["docker-compose", "--profile", profile, "config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["services"]["triton" if profile == "gpu" else "triton-cpu"]


# --------------------------------------------------------------------------- the cpu profile, for real


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _images(n: int) -> list[str]:
    from PIL import Image

    from training import shapes_world as sw

    out = []
    for i in range(n):
        rng = np.random.default_rng([11, i])
        buf = io.BytesIO()
        Image.fromarray(sw.render(sw.sample_scene(rng), rng)).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


@pytest.mark.slow
@pytest.mark.compose
@pytest.mark.timeout(3600)
def test_cpu_profile_up_answers_like_the_embedded_backend(tmp_path):
    from fastapi.testclient import TestClient

    import onnxruntime

    from service.app import create_app
    from tests.docker_env import DockerEngine, DockerUnavailable

    if not all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector", "vqa")):
        pytest.skip("model_repository has no ONNX files: run `make export`")
    engine = DockerEngine()
    try:
        engine.start()
    except DockerUnavailable as exc:
        pytest.skip(f"no Docker engine can start here: {exc}")
    project = f"glipv2test{int(time.time())}"
    timings = {}
    try:
        base = engine.base_image()
        timings["build gateway s"] = engine.build("docker/gateway.Dockerfile", "glipv2-gateway:latest",
                                                  {"BASE_IMAGE": base})
        timings["build triton-cpu s"] = engine.build(
            "docker/triton-cpu.Dockerfile", "glipv2-triton-cpu:latest",
            {"BASE_IMAGE": base, "ONNXRUNTIME_VERSION": onnxruntime.__version__})
        port = local_triton.free_port()
        env = {"COMPOSE_PROJECT_NAME": project, "GATEWAY_PORT": str(port),
               "TRITON_HTTP_PORT": str(local_triton.free_port({port})),
               "TRITON_GRPC_PORT": str(local_triton.free_port({port})),
               "TRITON_METRICS_PORT": str(local_triton.free_port({port}))}
        t0 = time.monotonic()
        up = engine.compose("--profile", "cpu", "up", "-d", "--no-build", env=env, timeout=900, check=False)
        if up.returncode != 0:
            logs = engine.compose("--profile", "cpu", "logs", "--tail", "80", env=env, check=False)
            pytest.fail(f"docker-compose up failed:\n{up.stderr[-3000:]}\n{logs.stdout[-6000:]}")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                logs = engine.compose("--profile", "cpu", "logs", "--tail", "60", env=env, check=False)
                pytest.fail(f"the gateway container was not ready in 300 s:\n{logs.stdout[-6000:]}")
            time.sleep(2)
        timings["up to ready s"] = time.monotonic() - t0
        ps = engine.docker("ps", "--format", "{{.Names}} {{.Status}}").stdout
        assert "(healthy)" in ps and "triton-cpu" in ps, ps

        models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())
        assert models["backend"] == "triton" and models["flavour"] == "cpu" and models["device"] == "cpu"

        images = _images(3)
        detect = {"images": [{"image": im, "prompt": "circle. square. triangle. star. hexagon. cross."}
                             for im in images], "score_threshold": 0.3}
        vqa = {"images": [{"image": im, "question": "how many circles are there?"} for im in images]}
        caption = {"images": [{"image": im} for im in images], "beam_size": 2}
        got = {"detect": _post(url + "/v1/detect", detect), "vqa": _post(url + "/v1/vqa", vqa),
               "caption": _post(url + "/v1/caption", caption)}
        with TestClient(create_app(Settings(repository=REPO, threads=1))) as client:
            want = {task: client.post(f"/v1/{task}", json=body).json()
                    for task, body in (("detect", detect), ("vqa", vqa), ("caption", caption))}
        for a, b in zip(got["detect"]["results"], want["detect"]["results"]):
            assert [d["phrase"] for d in a["detections"]] == [d["phrase"] for d in b["detections"]]
            assert len(a["detections"]) > 0
            for da, db in zip(a["detections"], b["detections"]):
                assert np.allclose(da["box"], db["box"], atol=0.05) and abs(da["score"] - db["score"]) < 1e-3
        for a, b in zip(got["vqa"]["results"], want["vqa"]["results"]):
            assert a["answer"] == b["answer"] and abs(a["score"] - b["score"]) < 1e-3
        for a, b in zip(got["caption"]["results"], want["caption"]["results"]):
            assert a["caption"] == b["caption"] and a["caption"]
        # the requests went through Triton: its statistics count executions of every model
        stats = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{env['TRITON_HTTP_PORT']}/v2/models/stats", timeout=10).read())
        executed = {m["name"]: m["execution_count"] for m in stats["model_stats"]}
        # (captions: the `caption` model decodes inside Triton, running the caption graphs in its
        # own process in the cpu flavour, so caption_start / caption_step see no requests)
        assert all(executed[m] > 0 for m in ("text_encoder", "detector", "vqa", "caption"))
        (ROOT / ".cache" / "docker" / "last-compose-test.json").write_text(json.dumps(
            {"timings": timings, "triton_executions": executed}, indent=2))
        print(json.dumps(timings))
    finally:
        try:
            engine.compose("--profile", "cpu", "down", "--volumes", "--remove-orphans",
                           env={"COMPOSE_PROJECT_NAME": project}, check=False, timeout=300)
            engine.docker("image", "prune", "--force", check=False)  # the images earlier builds replaced
        finally:
            engine.stop()
