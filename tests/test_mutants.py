"""The mutation list (mutants/*.toml) stays applicable: every entry parses, ids are unique,
each original text occurs exactly once in its file and each named test file exists.
(`make mutants` runs the mutants themselves; this keeps a stale entry from waiting for it.)"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants_run", ROOT / "mutants" / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = run  # dataclasses look their module up there
_spec.loader.exec_module(run)

MUTANTS = run.load()


def test_enough_mutants():
    assert len(MUTANTS) >= 20  # issue 16: at least 20, the README's headline claims among them


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_applies(mutant):
    assert run.stale_reason(mutant) is None, f"{mutant.source}: {mutant.id}: {run.stale_reason(mutant)}"
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).is_file(), f"{mutant.id}: {test} names no test file"


def test_malformed_lists_are_rejected(tmp_path):
    (tmp_path / "a.toml").write_text('[[mutant]]\nid = "x"\nfile = "f.py"\noriginal = "a"\nmutated = "a"\ntests = ["tests/t.py"]\n')
    with pytest.raises(ValueError, match="equals the original"):
        run.load(tmp_path)
    (tmp_path / "a.toml").write_text('[[mutant]]\nid = "x"\nfile = "f.py"\noriginal = "a"\nmutated = "b"\ntests = "tests/t.py"\n')
    with pytest.raises(ValueError, match="list of pytest ids"):
        run.load(tmp_path)
    ok = '[[mutant]]\nid = "x"\nfile = "f.py"\noriginal = "a"\nmutated = "b"\ntests = ["tests/t.py"]\n'
    (tmp_path / "a.toml").write_text(ok)
    (tmp_path / "b.toml").write_text(ok)
    with pytest.raises(ValueError, match="already used in a.toml"):
        run.load(tmp_path)


def test_stale_entry_is_reported(tmp_path):
    (tmp_path / "f.py").write_text("x = 1\nx = 1\n")
    m = run.Mutant("x", "f.py", "x = 1", "x = 2", ("tests/t.py",), "", "a.toml")
    assert "2 times" in run.stale_reason(m, tmp_path)
    assert "0 times" in run.stale_reason(run.Mutant("x", "f.py", "y", "z", (), "", "a.toml"), tmp_path)
    assert "does not exist" in run.stale_reason(run.Mutant("x", "g.py", "y", "z", (), "", "a.toml"), tmp_path)
