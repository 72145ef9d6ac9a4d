"""Kernel launches per decode step, counted statically in the optimized HLO that XLA dumps
(XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"): the decode loop's body is one step."""
from __future__ import annotations

import glob
import os
import re

# Instructions of an optimized HLO module that launch nothing of their own.
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
              "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id", "domain"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_OPCODE = re.compile(r" = .*?[\]\})] ([a-z][a-z0-9\-]*)\(")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        if name is None:
            m = _COMPUTATION.match(line)
            if m:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    comps["__entry__"] = comps[name]
        elif line == "}":
            name = None
        else:
            comps[name].append(line)
    return comps


_LOOP_PARTS = re.compile(r"(?:body|condition)=%?([\w.\-]+)")


def _zero() -> dict:
    return {"launches": 0, "pallas": 0, "nested_loops": 0}


def _add(total: dict, part: dict) -> None:
    for key, value in part.items():
        total[key] += value


def _count(comps: dict[str, list[str]], name: str, seen: tuple = ()) -> dict:
    """Launches of one run of computation `name` (see hlo_launches), entering what it calls."""
    total = _zero()
    if name in seen or name not in comps:
        return total
    seen = seen + (name,)
    for line in comps[name]:
        m = _OPCODE.search(line)
        if not m:
            continue
        op = m.group(1)
        if op not in _NO_LAUNCH:
            total["launches"] += 1
            total["pallas"] += op == "custom-call" and "xla.gpu.triton" in line
        elif op == "while":
            for c in _LOOP_PARTS.findall(line):
                _add(total, _count(comps, c, seen))
            total["nested_loops"] += 1
        elif op == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else \
                re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
            _add(total, max((_count(comps, c, seen) for c in names), key=lambda t: t["launches"], default={}))
        elif op == "call":
            for c in re.findall(r"to_apply=%?([\w.\-]+)", line):
                _add(total, _count(comps, c, seen))
    return total


def hlo_launches(hlo: str) -> dict:
    """Kernel launches per iteration of the largest `while` loop of an optimized HLO module's entry
    (a decode loop: one iteration = one decode step), counted statically.

    Every instruction of the loop's body and condition counts as one launch except those in
    _NO_LAUNCH (a fusion is one kernel); nested loops, conditionals and calls are entered (a nested
    loop's body once, its trip count unknown; a conditional's largest branch). Returns {"launches",
    "pallas": Pallas Triton calls among them, "nested_loops"}; all zero if the entry has no loop.
    """
    comps = _computations(hlo)
    best = _zero()
    for line in comps.get("__entry__", []):
        m = _OPCODE.search(line)
        if m and m.group(1) == "while":
            found = _zero()
            for c in _LOOP_PARTS.findall(line):
                _add(found, _count(comps, c))
            if found["launches"] > best["launches"]:
                best = found
    return best


def dump_launches(dump: str, layers: int, module: str = "decode_loop") -> list[dict]:
    """hlo_launches of every '*{module}*after_optimizations.txt' in the dump folder, printed ->
    [{"file", "launches", "pallas", "nested_loops", "per_layer": launches / layers}].
    FileNotFoundError if there is none, saying how to dump."""
    paths = sorted(glob.glob(os.path.join(dump, f"*{module}*after_optimizations.txt")))
    if not paths:
        raise FileNotFoundError(f"no '*{module}*after_optimizations.txt' in {dump!r}: dump with "
                                f"XLA_FLAGS='--xla_dump_to={dump} --xla_dump_hlo_as_text'")
    rows = []
    for path in paths:
        with open(path) as f:
            found = hlo_launches(f.read())
        found = {"file": os.path.basename(path), **found, "per_layer": found["launches"] / layers}
        rows.append(found)
        print(f"{found['file']}: {found['launches']} launches per step ({found['per_layer']:.1f} per layer of "
              f"{layers}), {found['pallas']} Pallas, {found['nested_loops']} nested loops")
    return rows
