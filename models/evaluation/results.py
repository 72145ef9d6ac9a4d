"""Evaluation results: a resumable JSON file, a text table and a plot of score vs transfer ratio."""
from __future__ import annotations

import json
import os

SCORE_LABEL = {"passkey": "passkey accuracy", "multikey": "multi-key accuracy", "repetition": "characters matched",
               "bpc": "bits per character (lower is better)"}


class ResultsFile:
    """Result rows kept in a JSON file {**header, "results": rows}, rewritten whole (never half-written)
    after each added row. An existing file with the same header is resumed (its rows kept, `done`
    lists their cells); one with another header is a ValueError, so no run mixes settings. path None
    keeps the rows in memory only."""

    def __init__(self, path, header: dict):
        self.path, self.header = path, dict(header)
        self.rows: list[dict] = []
        if path and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            if any(data.get(k) != v for k, v in self.header.items()):
                raise ValueError(f"{path} holds a run with other settings "
                                 f"({', '.join(f'{k}={data.get(k)!r}' for k in self.header)}); choose another file")
            self.rows = data.get("results", [])

    @property
    def done(self) -> set:
        """(task, method, compression) of the rows already there."""
        return {(r["task"], r["method"], r["compression"]) for r in self.rows}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.header, "results": self.rows}, f, indent=2)
        os.replace(tmp, self.path)


def format_table(results) -> str:
    lines = [f"{'task':<11} {'method':<11} {'compression':>11} {'transfer':>9} {'score':>9} {'n':>4}"]
    for r in results:
        lines.append(f"{r['task']:<11} {r['method']:<11} {r['compression']:>11.4g} {r['transfer_ratio']:>9.4f} "
                     f"{r['score']:>9.4g} {r['n']:>4}")
    return "\n".join(lines)


def plot(results, path: str, title: str) -> None:
    """One panel per task: each method's score against its measured transfer ratio, dense as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(task_names), figsize=(4.6 * len(task_names), 3.8), squeeze=False)
    styles = {"sparq": ("C0", "o"), "sparq-mean": ("C9", "s"), "sparq-logits": ("C4", "P"), "h2o": ("C1", "^"),
              "streaming": ("C2", "v"), "flexgen": ("C3", "D")}
    for ax, task in zip(axes[0], task_names):
        rows = [r for r in results if r["task"] == task]
        for r in rows:
            if r["method"] == "dense":
                ax.axhline(r["score"], color="k", ls="--", lw=1, label="dense")
        for name in dict.fromkeys(r["method"] for r in rows):
            if name == "dense":
                continue
            pts = sorted((r["transfer_ratio"], r["score"]) for r in rows if r["method"] == name)
            color, marker = styles.get(name, (None, "o"))
            ax.plot(*zip(*pts), marker=marker, color=color, label=name)
        if task in ("passkey", "multikey"):
            ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("transfer ratio (measured)")
        ax.set_ylabel(SCORE_LABEL.get(task, "score"))
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
