"""The project's inline tox plugin (``toxfile.py``): with CATSDOGS_TOX_DROP_ENVS=1 each test env's
virtualenv is gone before the next env starts, so a CI machine needs the disk of one env, not nine.
Real tox runs on a two-env project of its own (virtualenvs with no install, no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tox")

ROOT = Path(__file__).resolve().parents[1]

# env `b` fails unless env `a`'s virtualenv has already been removed when `b` runs
TOX_INI = """\
[tox]
env_list = a, b
skip_missing_interpreters = false

[testenv]
skip_install = true

[testenv:a]
commands = python -c "print('env a ran')"

[testenv:b]
commands = python -c "import pathlib, sys; sys.exit(3 if pathlib.Path(r'{toxworkdir}/a').exists() else {b_exit})"
"""


def _project(tmp_path: Path, b_exit: int = 0) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tox.ini").write_text(TOX_INI.replace("{b_exit}", str(b_exit)))
    shutil.copy(ROOT / "toxfile.py", project / "toxfile.py")
    return project


def _tox(project: Path, drop: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOX")}
    env.pop("CATSDOGS_TOX_DROP_ENVS", None)
    if drop is not None:
        env["CATSDOGS_TOX_DROP_ENVS"] = drop
    return subprocess.run([sys.executable, "-m", "tox"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def test_each_env_is_removed_before_the_next_runs_when_asked(tmp_path):
    project = _project(tmp_path)
    done = _tox(project, "1")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "env a ran" in out
    assert not (project / ".tox" / "a").exists() and not (project / ".tox" / "b").exists()
    assert f"a: removed {project / '.tox' / 'a'} (CATSDOGS_TOX_DROP_ENVS=1)" in out


def test_envs_are_kept_unless_asked(tmp_path):
    project = _project(tmp_path, b_exit=0)
    for drop in (None, "0"):
        done = _tox(project, drop)
        # `b` sees `a` still there: its exit code 3 is tox's failure, and both envs stay
        assert done.returncode != 0, done.stdout + done.stderr
        assert "b: FAIL code 3" in done.stdout + done.stderr
        assert (project / ".tox" / "a" / "pyvenv.cfg").is_file()
        assert (project / ".tox" / "b" / "pyvenv.cfg").is_file()
        assert "removed" not in done.stdout + done.stderr


def test_a_failing_env_is_removed_too_and_tox_still_fails(tmp_path):
    project = _project(tmp_path, b_exit=5)
    done = _tox(project, "1")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "b: FAIL code 5" in out
    assert not (project / ".tox" / "b").exists()
    assert f"b: removed {project / '.tox' / 'b'}" in out
    assert "a: OK" in out
