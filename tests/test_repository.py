"""The repository itself: no built binaries tracked (they bloat every clone and cannot be reviewed)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY_SUFFIXES = (".whl", ".so", ".pyd", ".dylib", ".dll", ".exe", ".a", ".o", ".pyc", ".egg", ".zip", ".tar",
                   ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")
ELF_MAGIC = b"\x7fELF"


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout (an unpacked source archive): there is no list of tracked files to check")
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def test_no_wheel_archive_or_compiled_object_is_tracked():
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    by_name = [f for f in files if f.lower().endswith(BINARY_SUFFIXES)]
    by_content = []
    for name in files:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                if f.read(4) == ELF_MAGIC:
                    by_content.append(name)
    assert not by_name and not by_content, (f"binaries tracked in git: {by_name + by_content}; remove them "
                                            "(git rm --cached) and keep them ignored (.gitignore)")
