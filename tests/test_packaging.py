"""pyproject.toml is the one home of the dependencies; requirements.txt is their pinned, known-good set.

The two must name the same packages (runtime dependencies plus the `test` extra), and a version pinned
with ``==`` in pyproject.toml must be the same pin in requirements.txt.
"""
import re
from pathlib import Path

import pytest

import gfdm_fast

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project's machines run 3.11)

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(spec):
    """(normalised name, the rest: version specifier and marker) of one requirement line."""
    m = NAME.match(spec)
    assert m, f"cannot parse requirement {spec!r}"
    return _norm(m.group(1)), spec[m.end():].strip()


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _declared(project):
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return dict(_parse(s) for s in specs)


def _pinned_set(text):
    """{name: rest} of requirements.txt (comments and blank lines dropped)."""
    out = {}
    for line in text.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        if line:
            name, rest = _parse(line)
            assert name not in out, f"requirements.txt lists {name} twice"
            out[name] = rest
    return out


def test_requirements_match_pyproject():
    declared = _declared(_pyproject()["project"])
    pinned = _pinned_set((ROOT / "requirements.txt").read_text())
    assert sorted(set(declared) - set(pinned)) == [], "declared in pyproject.toml, missing from requirements.txt"
    assert sorted(set(pinned) - set(declared)) == [], "in requirements.txt, not declared in pyproject.toml"
    for name, rest in declared.items():
        if rest.startswith("=="):
            assert pinned[name].split(";")[0].strip() == rest.split(";")[0].strip(), f"{name}: pins differ"


def test_parser_sees_names_markers_and_comments():
    got = _pinned_set("# header\nTorch==2.0  # why\nscikit_learn>=1\ntriton; platform_system == 'Linux'\n\n")
    assert got == {"torch": "==2.0", "scikit-learn": ">=1", "triton": "; platform_system == 'Linux'"}


def test_version_console_script_and_no_second_home():
    project = _pyproject()["project"]
    assert project["version"] == gfdm_fast.__version__
    assert project["scripts"] == {"gfdm-fast": "gfdm_fast.cli:main"}
    setup_py = (ROOT / "setup.py").read_text()
    for key in ("install_requires", "extras_require", "entry_points", "version=", "name="):
        assert key not in setup_py, f"setup.py declares {key}: metadata lives in pyproject.toml"
    assert not (ROOT / "pytest.ini").exists() and not (ROOT / "setup.cfg").exists()
