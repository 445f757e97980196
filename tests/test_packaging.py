"""What a fresh clone / a non-editable install gets: every yaml of recbole_mm/properties is tracked by git and
matched by setup.py's package_data."""

import fnmatch
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _properties_files():
    base = os.path.join(ROOT, "recbole_mm")
    out = []
    for root, _, files in os.walk(os.path.join(base, "properties")):
        out += [os.path.relpath(os.path.join(root, f), base) for f in files if f.endswith(".yaml")]
    return sorted(out)


def test_properties_are_package_data():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    globs = re.search(r'package_data=\{"recbole_mm": \[([^\]]*)\]', setup).group(1)
    patterns = re.findall(r'"([^"]+)"', globs)
    files = _properties_files()
    assert any(f.startswith("properties/dataset/") for f in files) and any(f.startswith("properties/model/") for f in files)
    for f in files:
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f


def test_properties_are_not_git_ignored():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        return
    files = [os.path.join("recbole_mm", f) for f in _properties_files()]
    proc = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "", f"ignored by .gitignore: {proc.stdout}"
