"""A user's fresh clone passes its own test suite: `git clone` into an empty directory, `make test`, nothing beside it.

This is the README's quickstart for contributors, run as written. The clone is of the working tree as git sees it
(HEAD plus uncommitted changes and untracked files that are not ignored), so a file that was never added, or a test
that reads something outside the checkout (the reference data once lived in ../shared), fails here before it fails
for a user. Slow (a fresh virtual environment and the whole suite but its `slow` tests, which the outer run has), so
marked `quickstart`; CI runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INNER = "CA2VDM_IN_FRESH_CLONE"  # set for the clone's own run, whose copy of this test then skips (no recursion)


def git(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, **kwargs)


def clone_working_tree(dest: Path) -> None:
    git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest))
    patch = git("diff", "HEAD", "--binary").stdout
    if patch:
        git("apply", "--whitespace=nowarn", cwd=dest, input=patch)
    for name in git("ls-files", "--others", "--exclude-standard", "-z").stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.quickstart
def test_a_fresh_clone_passes_make_test(tmp_path):
    if os.environ.get(INNER):
        pytest.skip("this is the fresh clone's own run")
    if os.environ.get("CA2VDM_QUICKSTART") == "0":
        pytest.skip("CA2VDM_QUICKSTART=0")
    clone = tmp_path / "ca2vdm"
    clone_working_tree(clone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca2vdm"]  # nothing beside it
    assert not (clone / ".venv").exists()
    # the clone builds its own environment: nothing of this process's virtual environment leaks in
    venv = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")).resolve()
    outside = [p for p in os.environ["PATH"].split(os.pathsep) if not Path(p).resolve().is_relative_to(venv)]
    path = os.pathsep.join(outside)
    # a user types `make test` in a shell: no outer make's variables (CI runs this test under `make test`, whose
    # MAKELEVEL/MAKEFLAGS would make the inner make print "Leaving directory" after pytest's closing line)
    leaked = ("VIRTUAL_ENV", "PYTHONPATH", "PYTEST_ADDOPTS", "MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in leaked}
    env.update({INNER: "1", "PATH": path})
    # the clone's run leaves out the `slow` tests (a local Ray cluster, the hostile-load run): they need nothing a
    # fresh clone could lack that the rest does not, and the outer run (CI's own) runs them; this keeps CI's time
    env["PYTEST_ADDOPTS"] = "-m 'not slow'"
    result = subprocess.run(["make", "test"], cwd=clone, env=env, capture_output=True, text=True, timeout=45 * 60)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    # pytest's closing line: the last line of its output that counts passed tests (pip's warnings go to stderr)
    closing = [line for line in result.stdout.splitlines() if re.search(r"\d+ passed.* in [\d.]+s", line)]
    assert closing, result.stdout[-6000:]
    summary = closing[-1]
    assert not re.search(r"\d+ (failed|errors?)\b", summary), summary
