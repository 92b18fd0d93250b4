"""pyproject.toml: kd builds and installs offline (no build isolation: the venv's setuptools) from a copy of the
checkout, as the package `kd` alone, with requirements.txt's pins; the extras list the other requirement files' pins.
Expected contents come from the checkout itself (kd/**/*.py, the requirement files), read here."""

import email
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kd

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("kd", "configs", "tests", "benchmarks", "docs")  # not .venv, data/, runs/, checkpoints/ ...
OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check", "--quiet"]


def pins(name: str) -> set[str]:
    """The requirements a requirements file adds itself (not those of the files it includes with -r), normalized."""
    lines = (line.partition(" #")[0].strip() for line in (ROOT / name).read_text().splitlines())  # inline comments
    return {normalized(line) for line in lines if line and not line.startswith(("#", "-r"))}


def normalized(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout's flat layout: kd/ beside configs/, tests/, the scripts (what setuptools' automatic
    discovery refused to choose between)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is missing from this venv: pip install -r requirements-dev.txt")
    copy = tmp_path_factory.mktemp("checkout")
    for item in ROOT.iterdir():
        if item.is_file():
            shutil.copy2(item, copy / item.name)
        elif item.name in SOURCE_FOLDERS:
            shutil.copytree(item, copy / item.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, *OFFLINE], check=True, timeout=120)


def test_the_wheel_holds_the_kd_package_and_requirements_pins(checkout, tmp_path):
    pip("wheel", "-w", str(tmp_path), str(checkout))
    (wheel,) = tmp_path.glob("kd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith("/METADATA"))))
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kd").rglob("*.py") if "__pycache__" not in p.parts}
    assert {n for n in names if not n.startswith("kd-")} == expected  # no configs/, tests/, scripts
    assert metadata["Version"] == kd.__version__  # one version, kd/__init__.py's
    requires = metadata.get_all("Requires-Dist")
    plain = {normalized(r) for r in requires if ";" not in r}
    extras = {}
    for r in requires:
        if ";" in r:
            requirement, _, marker = r.partition(";")
            extra = re.fullmatch(r'\s*extra == "([\w-]+)"', marker)[1]
            extras.setdefault(extra, set()).add(normalized(requirement.strip()))
    assert plain == pins("requirements.txt")
    assert extras == {"dev": pins("requirements-dev.txt"), "export": pins("requirements-export.txt")}, (
        "pyproject.toml's [project.optional-dependencies] no longer match the requirement files: update it"
    )


def test_an_editable_install_imports_kd_from_the_checkout(checkout, tmp_path):
    prefix = tmp_path / "prefix"
    pip("install", "--prefix", str(prefix), "-e", str(checkout))
    (site_packages,) = prefix.glob("lib/python*/site-packages")
    probe = (
        f"import site; site.addsitedir({str(site_packages)!r}); import kd.data.multispectral, importlib.util; "
        "print(kd.__file__, importlib.util.find_spec('configs') is None)"
    )
    # from another folder, without the checkout on sys.path: only the install can find kd
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(checkout / "kd" / "__init__.py"), "True"]
    # the scripts, run by path from any folder (README: paths in a config are relative to where you run)
    script = [sys.executable, str(checkout / "distill.py"), "--config", str(checkout / "configs/b0.yaml")]
    shown = subprocess.run([*script, "--print-config"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "teacher_checkpoint:" in shown.stdout, shown.stderr
