"""The FreeBSD port skeleton in ports/mail/repeld, against a staged install of this tree.

FreeBSD's `make stage check-plist` cannot run here, so this does what it does with the
same inputs: install the package into a staging root as the port's pep517 install does
(`pip install --root STAGE --prefix /usr/local`), run the Makefile's post-install
lines, install files/repeld.in as USE_RC_SUBR does, and then require that the files in
the staging root are exactly those the package will list: the wheel's own files (what
USE_PYTHON=autoplist lists, read from the installed RECORD), the rc.d script, and the
entries of pkg-plist. A file the install adds and no list names, or a pkg-plist entry
that nothing installs, fails the test.

The rest of the Makefile is checked against the tree: the version, the dependencies and
their floors (pyproject.toml's), and files/repeld.in (scripts/rc.d/repeld with
%%PREFIX%% for /usr/local). About 20 s, most of it building the native module.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from repeld import __version__

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PORT = ROOT / "ports" / "mail" / "repeld"
PREFIX = "/usr/local"


def _makefile() -> tuple[dict[str, str], list[str]]:
    """The port Makefile's variables (continuations joined) and its post-install lines."""
    text = (PORT / "Makefile").read_text().replace("\\\n", " ")
    variables: dict[str, str] = {}
    recipe: list[str] = []
    in_recipe = False
    for line in text.splitlines():
        if in_recipe and line.startswith("\t"):
            recipe.append(line.strip())
            continue
        in_recipe = line.startswith("post-install:")
        match = re.match(r"^([A-Z_]+)=\s*(.*)$", line)
        if match:
            variables[match.group(1)] = " ".join(match.group(2).split("#")[0].split())
    return variables, recipe


def _sh(words: list[str], stage: Path, wrksrc: Path) -> str:
    """One post-install line with the ports framework's variables as FreeBSD sets them."""
    substitutions = {
        "${INSTALL_DATA}": "install -m 0444",
        "${INSTALL_SCRIPT}": "install -m 0555",
        "${MKDIR}": "mkdir -p",
        "${STAGEDIR}": str(stage),
        "${PREFIX}": PREFIX,
        "${WRKSRC}": str(wrksrc),
    }
    line = " ".join(words)
    for name, value in substitutions.items():
        line = line.replace(name, value)
    assert "${" not in line, f"a variable this test does not know: {line}"
    return line


def test_the_version_is_the_package_version() -> None:
    variables, _ = _makefile()
    assert variables["DISTVERSION"] == __version__
    assert variables["PORTNAME"] == "repeld"
    assert "mail" in variables["CATEGORIES"].split()


def test_the_run_dependencies_are_pyprojects() -> None:
    variables, _ = _makefile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {}
    for requirement in project["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()  # type: ignore[union-attr]
        wanted[name.lower()] = floor
    ported = dict(
        re.findall(r"\$\{PYTHON_PKGNAMEPREFIX\}([a-z0-9_-]+)>=([0-9.]+):", variables["RUN_DEPENDS"])
    )
    assert ported == wanted


def test_the_rc_script_is_the_shipped_one() -> None:
    shipped = (ROOT / "scripts" / "rc.d" / "repeld").read_text()
    assert (PORT / "files" / "repeld.in").read_text() == shipped.replace(PREFIX, "%%PREFIX%%")
    variables, _ = _makefile()
    assert variables["USE_RC_SUBR"] == "repeld"
    assert variables["USERS"] == variables["GROUPS"] == "repeld"
    # The user the sample configuration drops to is the one pkg adds; the rc.d script
    # names none unless rc.conf does (its --user would override the file's).
    assert "repeld_user:=" not in shipped
    assert 'user = "repeld"' in (ROOT / "scripts" / "repeld.toml.sample").read_text()


def _record_files(stage: Path) -> set[str]:
    """What autoplist lists: every file in the installed distribution's RECORD."""
    (record,) = stage.glob(
        f"usr/local/lib/python3*/site-packages/repeld-{__version__}.dist-info/RECORD"
    )
    site = record.parent.parent
    listed = set()
    with record.open(newline="") as f:
        for row in csv.reader(f):
            path = os.path.normpath(site / row[0])
            listed.add(os.path.relpath(path, stage / PREFIX.lstrip("/")))
    return listed


def test_pkg_plist_lists_what_the_staged_install_adds(tmp_path: Path) -> None:
    wrksrc = tmp_path / "wrksrc"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (wrksrc / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, wrksrc / name)
    stage = tmp_path / "stage"
    pip_target = ["--root", str(stage), "--prefix", PREFIX]
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *pip_target, str(wrksrc)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_ROOT_USER_ACTION": "ignore"},
    )
    assert install.returncode == 0, install.stderr
    # The staging root's hierarchy, as the framework's mtree (BSD.local.dist) makes it.
    for directory in ("etc/rc.d", "bin", "share/man/man5", "share/man/man8"):
        (stage / PREFIX.lstrip("/") / directory).mkdir(parents=True, exist_ok=True)
    _, post_install = _makefile()
    assert post_install, "the Makefile has a post-install target"
    for line in post_install:
        subprocess.run(["sh", "-ec", _sh(line.split(), stage, wrksrc)], check=True, timeout=60)
    # USE_RC_SUBR: files/repeld.in, %%PREFIX%% substituted, as etc/rc.d/repeld (listed by it).
    rc = stage / PREFIX.lstrip("/") / "etc" / "rc.d" / "repeld"
    rc.write_text((PORT / "files" / "repeld.in").read_text().replace("%%PREFIX%%", PREFIX))

    listed = _record_files(stage) | {"etc/rc.d/repeld"}
    directories = []
    for entry in (PORT / "pkg-plist").read_text().splitlines():
        if entry.startswith("@sample "):
            listed.add(entry.split()[1])  # pkg copies it to the name without .sample
        elif entry.startswith("@dir"):
            directories.append(entry.split()[-1])
        else:
            assert not entry.startswith("@"), f"a keyword this test does not know: {entry}"
            listed.add(entry)
    prefix = stage / PREFIX.lstrip("/")
    staged = {str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir()}
    outside = {
        str(p.relative_to(stage))
        for p in stage.rglob("*")
        if not p.is_dir() and prefix not in p.parents
    }
    assert not outside, f"files staged outside {PREFIX}: {sorted(outside)}"
    assert sorted(staged - listed) == [], "staged, but no list names them"
    assert sorted(listed - staged) == [], "listed, but nothing installs them"
    for directory in directories:
        assert (stage / directory.lstrip("/")).is_dir(), directory
    # What an administrator looks for after `pkg install repeld`.
    for path in ("bin/repeld", "share/man/man8/repeld.8", "share/man/man5/repeld.conf.5"):
        assert path in staged, path
