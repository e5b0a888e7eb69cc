"""A Docker engine of the test's own, for `make compose-test` (tests/test_compose.py).

No Docker engine runs on the development machines and no registry is reachable, but
Debian's packages give one: ``DockerEngine`` installs docker.io, docker-compose and
debootstrap when they are missing, starts ``dockerd`` with its own data root, exec root,
socket and pid file (no iptables, no default bridge: compose networks are bridges of their
own), and stops it by its PID. Nothing else on the machine is touched.

No image can be pulled either: ``base_image()`` builds a Debian bookworm base
(``debootstrap --variant=minbase`` + ``docker import``; bookworm's python3 is 3.11, the
project's) and caches the root file system as a tarball, so a rerun imports it in seconds.
The Dockerfiles take their base image as the BASE_IMAGE build argument.

pip inside a build reaches the package index the way pip on this machine does: the CA
bundle pip trusts here (PIP_CERT, pip's `global.cert`, SSL_CERT_FILE) goes into the build
as a BuildKit secret, mounted for the pip step only and never part of an image.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".cache" / "docker"
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
BASE_TAG = "glipv2-base:bookworm"
# what the base holds besides minbase: python3.11 with venv, its shared libpython (the
# python backend stub links it) and the CA store (what python:3.11-slim-bookworm gives)
BASE_PACKAGES = ("python3", "python3-venv", "libpython3.11", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class DockerUnavailable(RuntimeError):
    """The engine cannot be installed or started here; the message says why."""


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_packages() -> None:
    """apt-get install what is missing (the tests run as root, as CI does)."""
    missing = [pkg for exe, pkg in PACKAGES.items() if shutil.which(exe) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise DockerUnavailable(f"{', '.join(missing)} missing and not root: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        proc = _run(cmd, timeout=900, env=env)
        if proc.returncode != 0:
            raise DockerUnavailable(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr)[-2000:]}")


def pip_ca_bundle() -> Path | None:
    """The CA bundle pip uses on this machine (so that builds pass the same TLS proxy)."""
    candidates = [os.environ.get("PIP_CERT")]
    for conf in (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), Path.home() / ".config/pip/pip.conf"):
        parser = configparser.ConfigParser()
        try:
            parser.read(conf)
        except configparser.Error:
            continue
        candidates.append(parser.get("global", "cert", fallback=None))
    candidates += [os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


class DockerEngine:
    """dockerd with its own state under `state` (default .cache/docker in the project)."""

    def __init__(self, state: Path = STATE) -> None:
        self.state = Path(state)
        self.data_root = self.state / "data"
        # exec root and socket paths must stay short (unix socket paths are limited to 108 bytes)
        tag = hashlib.sha1(str(self.state).encode()).hexdigest()[:8]
        self.exec_root = Path(f"/tmp/glipv2-docker-{tag}")
        self.socket = self.exec_root / "docker.sock"
        self.pidfile = self.state / "dockerd.pid"
        self.log_path = self.state / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self.docker_bin = shutil.which("docker", path="/usr/bin") or shutil.which("docker") or "docker"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def start(self, timeout: float = 60) -> "DockerEngine":
        ensure_packages()
        self.state.mkdir(parents=True, exist_ok=True)
        # one engine per data root: a second run waits for the first instead of stopping it
        self._lock = open(self.state / "engine.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DockerUnavailable(f"another run holds the Docker engine of {self.state} (engine.lock)") from None
        self.data_root.mkdir(exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
             "-H", f"unix://{self.socket}", "--pidfile", str(self.pidfile),
             "--iptables=false", "--ip6tables=false", "--bridge=none"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DockerUnavailable(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.docker("info", check=False, timeout=10).returncode == 0:
                return self
            time.sleep(0.5)
        self.stop()
        raise DockerUnavailable(f"dockerd did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def _stop_stale(self) -> None:
        """A dockerd of an earlier, killed run on the same data root (its pid file says which)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if cmdline and cmdline[0].endswith(b"dockerd") and str(self.data_root).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()  # releases the flock
            self._lock = None

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        proc = _run([self.docker_bin, *args], timeout=timeout, env=kw.pop("env", self.env), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                               f"\n{proc.stderr[-3000:]}")
        return proc

    def compose(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess:
        proc = _run(["docker-compose", *args], timeout=timeout, cwd=ROOT, env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=30).returncode == 0

    def base_image(self) -> str:
        """The Debian bookworm base (debootstrap, once; the tarball is kept for reruns)."""
        if self.has_image(BASE_TAG):
            return BASE_TAG
        key = hashlib.sha1(" ".join(BASE_PACKAGES).encode()).hexdigest()[:10]
        tarball = self.state / f"bookworm-minbase-{key}.tar"
        if not tarball.is_file():
            rootfs = self.state / "rootfs"
            shutil.rmtree(rootfs, ignore_errors=True)
            proc = _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
                         str(rootfs), DEBIAN_MIRROR], timeout=1200)
            if proc.returncode != 0:
                raise DockerUnavailable(f"debootstrap failed: {(proc.stdout + proc.stderr)[-2000:]}")
            shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
            tmp = tarball.with_suffix(".tmp")
            proc = _run(["tar", "-C", str(rootfs), "-cf", str(tmp), "."], timeout=600)
            if proc.returncode != 0:
                raise DockerUnavailable(f"tar of the base failed: {proc.stderr[-2000:]}")
            os.replace(tmp, tarball)
            shutil.rmtree(rootfs, ignore_errors=True)
        self.docker("import", str(tarball), BASE_TAG, timeout=600)
        return BASE_TAG

    def build(self, dockerfile: str, tag: str, build_args: dict[str, str] | None = None,
              timeout: float = 1800) -> float:
        """docker build (BuildKit, host network) from the project root; returns seconds."""
        args = ["build", "--network", "host", "-f", str(ROOT / dockerfile), "-t", tag]
        for k, v in (build_args or {}).items():
            args += ["--build-arg", f"{k}={v}"]
        ca = pip_ca_bundle()
        if ca is not None:
            args += ["--secret", f"id=pip_cert,src={ca}"]
        t0 = time.monotonic()
        self.docker(*args, str(ROOT), timeout=timeout)
        return time.monotonic() - t0
