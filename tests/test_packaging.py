"""What a fresh clone / a non-editable install gets: every yaml of the top-level properties/ folder is tracked by
git, is package data of ``recbole_mm.properties`` in setup.py, and is found at run time by a real install."""

import fnmatch
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPERTIES = os.path.join(ROOT, "properties")

# Run in a fresh interpreter outside the source tree: which properties folder does the package see, and does the
# plugin's Config layer MoRec's yaml from it?
PROBE = """
import json, os, sys
import recbole_mm
from recbole_mm import paths
from recbole_mm.config import plugin_yaml_files
from recbole_mm.registry import get_model
files = plugin_yaml_files(get_model("MoRec"), "ml-100k-mm")
print(json.dumps({"package": os.path.dirname(recbole_mm.__file__), "properties": paths.properties_dir(),
                  "files": files}))
"""


def _properties_files():
    out = []
    for root, _, files in os.walk(PROPERTIES):
        out += [os.path.relpath(os.path.join(root, f), PROPERTIES) for f in files if f.endswith(".yaml")]
    return sorted(out)


def _setup_kwargs(monkeypatch) -> dict:
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def test_properties_are_package_data(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    files = _properties_files()
    assert "overall_mm.yaml" in files and os.path.join("model", "MoRec.yaml") in files
    assert any(f.startswith("dataset" + os.sep) for f in files)
    assert kw["package_dir"]["recbole_mm.properties"] == "properties"
    for f in files:
        folder, name = os.path.split(f)
        package = ".".join(["recbole_mm.properties"] + ([p for p in folder.split(os.sep)] if folder else []))
        assert package in kw["packages"], f"{f}: package {package} is not in setup.py's packages"
        assert any(fnmatch.fnmatch(name, p) for p in kw["package_data"].get(package, ())), f


def test_properties_are_not_git_ignored():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    files = [os.path.join("properties", f) for f in _properties_files()]
    proc = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "", f"ignored by .gitignore: {proc.stdout}"


def _clone(dest: str) -> str:
    """The files a commit of this work tree holds (tracked + new, not ignored): what a fresh clone gets."""
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    for rel in proc.stdout.split("\0"):
        if not rel or not os.path.isfile(os.path.join(ROOT, rel)):  # deleted, not yet committed
            continue
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return dest


def _probe(pythonpath: str, cwd: str) -> dict:
    import json

    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_found_under(res: dict, base: str):
    assert os.path.realpath(res["package"]).startswith(os.path.realpath(base)), res  # not this checkout
    names = [os.path.relpath(f, res["properties"]) for f in res["files"]]
    assert "overall_mm.yaml" in names and os.path.join("model", "MoRec.yaml") in names, res
    assert os.path.join("dataset", "ml-100k-mm.yaml") in names, res
    for f in res["files"]:
        assert os.path.realpath(f).startswith(os.path.realpath(base)), f


def test_non_editable_install_finds_the_yaml(tmp_path):
    """``pip install .`` (not editable) of a clean copy into a --target folder: the yaml come as package data."""
    src = _clone(str(tmp_path / "src"))
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), src],
                          cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        installed = target / "recbole_mm" / "properties"
        assert (installed / "overall_mm.yaml").is_file() and (installed / "model" / "MoRec.yaml").is_file()
        assert not (target / "properties").exists()  # no stray top-level folder in site-packages
        res = _probe(str(target), cwd=str(tmp_path))
        _assert_found_under(res, str(target))
        assert os.path.samefile(res["properties"], installed)
    finally:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)


def test_fresh_clone_finds_the_yaml(tmp_path):
    """A clean copy of the work tree used without installing it (PYTHONPATH): the top-level properties/."""
    src = _clone(str(tmp_path / "clone"))
    try:
        res = _probe(src, cwd=str(tmp_path))
        _assert_found_under(res, src)
        assert os.path.samefile(res["properties"], os.path.join(src, "properties"))
    finally:
        shutil.rmtree(src, ignore_errors=True)


def test_missing_properties_is_a_clear_error(monkeypatch, tmp_path):
    from recbole_mm import paths

    monkeypatch.setattr(paths, "_PACKAGE_DIR", str(tmp_path / "recbole_mm"))
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="overall_mm.yaml.*Reinstall"):
        paths.properties_dir()
