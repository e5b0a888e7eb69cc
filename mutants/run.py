"""Mutation check: put each listed bug into a scratch copy of the tree and run the tests
that must catch it.

A mutant is one exact text replacement in one file plus the pytest node ids that must
fail once it is in. The lists are the TOML files in this folder (one per area or feature,
so helpers append without touching each other's files), each a sequence of tables:

    [[mutant]]
    id = "nms-suppresses-at-threshold"          # unique over all lists
    file = "glipv2/postprocess.py"              # relative to the repository root
    original = "iou > threshold"                # must occur exactly once in the file
    mutated = "iou >= threshold"
    tests = ["tests/test_postprocess.py::test_nms_keeps_box_at_iou_threshold"]
    why = "NMS must keep a box whose IoU equals the threshold"   # optional

For every mutant the runner applies the replacement in a scratch copy (never this tree),
runs only the named tests there and calls the mutant
  killed    when the tests fail (pytest exit status 1),
  SURVIVED  when they pass (the bug goes unnoticed: the tests need work),
  ERROR     when the original text is not found exactly once (stale entry: the code moved),
            the tests cannot be collected, time out or select no test.
Before the mutants, the union of the named tests runs once on the unmodified copy: a
test that fails or skips there can kill nothing, so that is an ERROR too.

Exit status 0 only when every selected mutant was killed. Usage:
    python mutants/run.py [-j 2] [-k GLOB] [--list] [--no-baseline]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTS = Path(__file__).resolve().parent
# Ignored build outputs the tests read (the rendered ONNX graphs of model_repository/):
# copied into each scratch copy. The tritonserver install under .cache/ is large and only
# read, so it is linked instead.
COPY_IGNORED = ("model_repository/",)
LINK_IGNORED = (".cache",)
REQUIRED = ("id", "file", "original", "mutated", "tests")


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    why: str
    source: str  # the list file it came from


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str  # killed | SURVIVED | ERROR
    detail: str
    seconds: float


def load(lists_dir: Path = LISTS) -> list[Mutant]:
    """Reads every *.toml list; raises ValueError naming the file on a malformed entry."""
    mutants: list[Mutant] = []
    seen: dict[str, str] = {}
    for path in sorted(lists_dir.glob("*.toml")):
        with path.open("rb") as f:
            data = tomllib.load(f)
        unknown = set(data) - {"mutant"}
        if unknown:
            raise ValueError(f"{path.name}: unknown top-level keys {sorted(unknown)} (use [[mutant]] tables)")
        for i, entry in enumerate(data.get("mutant", [])):
            where = f"{path.name} mutant #{i + 1}"
            missing = [k for k in REQUIRED if not entry.get(k)]
            if missing:
                raise ValueError(f"{where}: missing {missing}")
            extra = set(entry) - set(REQUIRED) - {"why"}
            if extra:
                raise ValueError(f"{where} ({entry['id']}): unknown keys {sorted(extra)}")
            if entry["original"] == entry["mutated"]:
                raise ValueError(f"{where} ({entry['id']}): mutated text equals the original")
            tests = entry["tests"]
            if isinstance(tests, str) or not all(isinstance(t, str) and t.startswith("tests/") for t in tests):
                raise ValueError(f"{where} ({entry['id']}): tests must be a list of pytest ids under tests/")
            if entry["id"] in seen:
                raise ValueError(f"{where}: id {entry['id']!r} already used in {seen[entry['id']]}")
            seen[entry["id"]] = path.name
            mutants.append(Mutant(entry["id"], entry["file"], entry["original"], entry["mutated"],
                                  tuple(tests), entry.get("why", ""), path.name))
    return mutants


def stale_reason(mutant: Mutant, root: Path = ROOT) -> str | None:
    """Why the mutant cannot be applied to the tree at root, or None when it can."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.original)
    if count != 1:
        return f"original text found {count} times in {mutant.file} (must be exactly once)"
    return None


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, check=True, capture_output=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def make_copy(dest: Path) -> None:
    """The working tree as it is now (tracked and untracked, not ignored, files, uncommitted
    edits included) plus the ignored build outputs the tests read."""
    files = _git_files("--cached", "--others", "--exclude-standard")
    ignored = [p for p in _git_files("--others", "--ignored", "--exclude-standard")
               if p.startswith(COPY_IGNORED)]
    for rel in files + ignored:
        src = ROOT / rel
        if not src.is_file():  # deleted but not yet staged
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for rel in LINK_IGNORED:
        if (ROOT / rel).exists():
            (dest / rel).symlink_to(ROOT / rel)
    # Some tests ask git about the tree (`git check-ignore` for where results may go): the
    # copy is a repository of its own, as a clone would be, so they see the same .gitignore.
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The venv's editable install points at the real tree; the copy's packages go first
    # on the path (for pytest and for every subprocess a test starts).
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_copy_imports(copy: Path) -> None:
    code = "import glipv2, training, service, export; print(glipv2.__file__, training.__file__, service.__file__, export.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != 4 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise RuntimeError(f"the scratch copy's packages are not the ones imported: {out.stdout}{out.stderr}")


_RUNNING: set[subprocess.Popen] = set()
_LOCK = threading.Lock()
_STOPPING = threading.Event()  # interrupted: queued mutants are not started


def _kill(proc: subprocess.Popen) -> None:
    """Ends the process group of one test run (what is left of it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(*_: object) -> None:
    _STOPPING.set()
    with _LOCK:
        for proc in list(_RUNNING):
            _kill(proc)
    raise SystemExit(130)


@dataclasses.dataclass
class Outcome:
    returncode: int
    tests: int
    failed: int
    skipped: int
    tail: str
    timed_out: bool


def run_pytest(copy: Path, tests: list[str], timeout: float, stop_first: bool) -> Outcome:
    report = copy / ".mutant-junit.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    if stop_first:
        cmd.insert(4, "-x")
    # A session of its own: a timeout or an interrupted runner ends the tests' children too
    # (training subprocesses, a tritonserver), not just pytest.
    proc = subprocess.Popen(cmd, cwd=copy, env=_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    with _LOCK:
        _RUNNING.add(proc)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        stdout, _ = proc.communicate()
        return Outcome(-1, 0, 0, 0, stdout[-2000:], True)
    finally:
        _kill(proc)
        with _LOCK:
            _RUNNING.discard(proc)
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")
    n = failed = skipped = 0
    if report.is_file():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            n += int(suite.get("tests", 0))
            failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped += int(suite.get("skipped", 0))
    return Outcome(out.returncode, n, failed, skipped, (out.stdout + out.stderr)[-3000:], False)


def run_mutant(mutant: Mutant, copy: Path, timeout: float) -> Result:
    start = time.monotonic()
    reason = stale_reason(mutant, copy)
    if reason:
        return Result(mutant, "ERROR", f"stale: {reason}", 0.0)
    path = copy / mutant.file
    original_text = path.read_text()
    path.write_text(original_text.replace(mutant.original, mutant.mutated, 1))
    try:
        out = run_pytest(copy, list(mutant.tests), timeout, stop_first=True)
    finally:
        path.write_text(original_text)
    took = time.monotonic() - start
    if out.timed_out:
        return Result(mutant, "ERROR", f"tests ran past {timeout:.0f} s", took)
    if out.returncode == 1 and out.failed:
        return Result(mutant, "killed", f"{out.failed} of {out.tests} test(s) failed", took)
    if out.returncode == 0:
        return Result(mutant, "SURVIVED", f"{out.tests} test(s) ran, {out.skipped} skipped, all passed", took)
    return Result(mutant, "ERROR", f"pytest exit status {out.returncode}:\n{out.tail}", took)


def baseline(mutants: list[Mutant], copy: Path, timeout: float) -> list[str]:
    """Runs every named test once on the unmodified copy; returns problems found."""
    tests = sorted({t for m in mutants for t in m.tests})
    out = run_pytest(copy, tests, timeout, stop_first=False)
    if out.timed_out:
        return [f"baseline tests ran past {timeout:.0f} s"]
    problems = []
    if out.returncode != 0:
        problems.append(f"the named tests do not pass on the unmodified tree (exit {out.returncode}):\n{out.tail}")
    if out.skipped:
        problems.append(f"{out.skipped} named test(s) skip on the unmodified tree, so they can kill nothing:\n{out.tail}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="scratch copies running mutants side by side (default: min(2, CPUs))")
    parser.add_argument("-k", "--select", action="append", default=[],
                        help="only mutants whose id or list file matches this glob (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmodified tree")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (their paths are printed)")
    args = parser.parse_args(argv)

    mutants = load()
    signal.signal(signal.SIGTERM, _kill_all)
    signal.signal(signal.SIGINT, _kill_all)
    if args.select:
        mutants = [m for m in mutants if any(fnmatch.fnmatch(m.id, g) or fnmatch.fnmatch(m.source, g) for g in args.select)]
    if not mutants:
        print("no mutant selected", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id}  [{m.source}] {m.file}: {m.original!r} -> {m.mutated!r}\n    killed by: {' '.join(m.tests)}")
        return 0

    # Stale entries are reported up front, from this tree, without spending a test run.
    stale = {m.id: r for m in mutants if (r := stale_reason(m))}
    runnable = [m for m in mutants if m.id not in stale]
    jobs = max(1, min(args.jobs, len(runnable) or 1))
    scratch = Path(tempfile.mkdtemp(prefix="glipv2-mutants-"))
    print(f"{len(mutants)} mutants from {LISTS.relative_to(ROOT)}/*.toml; scratch copies under {scratch} ({jobs} at a time)",
          flush=True)
    results: list[Result] = [Result(m, "ERROR", f"stale: {stale[m.id]}", 0.0) for m in mutants if m.id in stale]
    problems: list[str] = []
    try:
        copies = []
        for i in range(jobs):
            copy = scratch / f"copy{i}"
            copy.mkdir()
            make_copy(copy)
            check_copy_imports(copy)
            copies.append(copy)
        if runnable and not args.no_baseline:
            start = time.monotonic()
            problems = baseline(runnable, copies[0], args.timeout * 2)
            print(f"baseline: named tests on the unmodified copy {'FAILED' if problems else 'pass'} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        if not problems:
            free: queue.Queue[Path] = queue.Queue()
            for copy in copies:
                free.put(copy)
            lock = threading.Lock()

            def work(m: Mutant) -> Result:
                if _STOPPING.is_set():
                    return Result(m, "ERROR", "not run: interrupted", 0.0)
                copy = free.get()
                try:
                    r = run_mutant(m, copy, args.timeout)
                finally:
                    free.put(copy)
                with lock:
                    print(f"{r.status:8s} {m.id} ({r.seconds:.0f} s): {r.detail.splitlines()[0] if r.detail else ''}", flush=True)
                return r

            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                results += list(pool.map(work, runnable))
    finally:
        if args.keep:
            print(f"scratch copies kept under {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    for p in problems:
        print(f"\nBASELINE PROBLEM: {p}")
    by = {s: [r for r in results if r.status == s] for s in ("killed", "SURVIVED", "ERROR")}
    for r in by["SURVIVED"] + by["ERROR"]:
        print(f"\n{r.status} {r.mutant.id} [{r.mutant.source}] {r.mutant.file}\n  {r.mutant.original!r} -> {r.mutant.mutated!r}\n"
              f"  tests: {' '.join(r.mutant.tests)}\n  {r.detail}")
    print(f"\nmutants: {len(results)}, killed {len(by['killed'])}, survived {len(by['SURVIVED'])}, errors {len(by['ERROR'])}"
          + (", baseline failed" if problems else ""))
    return 0 if not problems and len(by["killed"]) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
