"""Evaluation results: a resumable JSON file, a text table and a plot of score vs transfer ratio."""
from __future__ import annotations

import json
import os

ROW_KEYS = ("task", "method", "compression", "transfer_ratio", "score", "n")
PARTIAL_KEYS = ("task", "method", "compression", "n", "batch", "batches", "scores", "moved")


def check_output_path(path: str, what: str = "path", image: bool = False) -> str:
    """path, if a file can be written there: its folder exists, it is not a folder itself, and (image)
    its extension is one matplotlib writes. ValueError naming `what`, the path and what to change."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a file path, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; give a file path in it")
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r}: its folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path!r}: its folder {folder} is not writable")
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if image:
        from matplotlib.backend_bases import FigureCanvasBase
        writes = sorted(FigureCanvasBase.get_supported_filetypes())      # what savefig writes here
        if extension not in writes:
            raise ValueError(f"{what} {path!r} must end in an image extension matplotlib writes "
                             f"({', '.join('.' + e for e in writes)}), got {'.' + extension if extension else 'none'}")
    return path

SCORE_LABEL = {"passkey": "passkey accuracy", "multikey": "multi-key accuracy", "repetition": "characters matched",
               "bpc": "bits per character (lower is better)", "needle": "needle accuracy",
               "code": "code characters matched"}


class ResultsFile:
    """Result rows kept in a JSON file {**header, "results": rows, "partial": the finished batches of
    unfinished cells}, rewritten whole by atomic replace (never half-written) after each added row or
    batch (add, progress: evaluate's on_result, on_progress). An existing file with the same header is resumed (its
    rows kept, `done` lists their cells); one with another header, or one that is not such a file
    (invalid JSON, not an object, rows without their keys, a folder), is a ValueError naming the file
    and what is wrong, and the file is never overwritten. path None keeps the rows in memory only."""

    def __init__(self, path, header: dict):
        self.path, self.header = path, dict(header)
        self.rows: list[dict] = []
        self.partial: dict = {}          # (task, method, compression) -> the batches of an unfinished cell
        if path:
            check_output_path(path, "the results file")
        if path and os.path.exists(path):
            self.rows = self._read(path)

    def _read(self, path: str) -> list[dict]:
        def bad(what: str) -> ValueError:
            return ValueError(f"{path} is not a results file of this program: {what}; fix or move it, or "
                              f"choose another file (it was not changed)")
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"invalid JSON ({err})") from None
        except OSError as err:
            raise ValueError(f"{path} cannot be read: {err.strerror or err}") from None
        if not isinstance(data, dict):
            raise bad(f"it holds a JSON {type(data).__name__}, not an object")
        if any(data.get(k) != v for k, v in self.header.items()):
            raise ValueError(f"{path} holds a run with other settings "
                             f"({', '.join(f'{k}={data.get(k)!r}' for k in self.header)}); choose another file")
        rows = data.get("results", [])
        if not isinstance(rows, list):
            raise bad(f'"results" is a {type(rows).__name__}, not a list of rows')
        for i, row in enumerate(rows):
            missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise bad(f"row {i} lacks {', '.join(missing)}" if isinstance(row, dict)
                          else f"row {i} is a {type(row).__name__}, not an object")
        partial = data.get("partial", [])
        if not isinstance(partial, list) or not all(isinstance(p, dict) and all(k in p for k in PARTIAL_KEYS)
                                                    for p in partial):
            raise bad(f'"partial" must be a list of objects with {", ".join(PARTIAL_KEYS)}')
        self.partial = {(p["task"], p["method"], p["compression"]): p for p in partial}
        return rows

    @property
    def done(self) -> set:
        """(task, method, compression) of the rows already there."""
        return {(r["task"], r["method"], r["compression"]) for r in self.rows}

    def add(self, row: dict) -> None:
        """A finished cell (evaluate's on_result): kept, its partial record dropped, the file rewritten."""
        self.partial.pop((row["task"], row["method"], row["compression"]), None)
        self.rows.append(row)
        self.write()

    def progress(self, record: dict) -> None:
        """A batch of an unfinished cell (evaluate's on_progress): kept, the file rewritten."""
        self.partial[(record["task"], record["method"], record["compression"])] = dict(record)
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        document = {**self.header, "results": self.rows}
        if self.partial:
            document["partial"] = list(self.partial.values())
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2)
        os.replace(tmp, self.path)


def format_table(results) -> str:
    lines = [f"{'task':<11} {'method':<11} {'compression':>11} {'transfer':>9} {'score':>9} {'n':>4}"]
    for r in results:
        lines.append(f"{r['task']:<11} {r['method']:<11} {r['compression']:>11.4g} {r['transfer_ratio']:>9.4f} "
                     f"{r['score']:>9.4g} {r['n']:>4}")
    return "\n".join(lines)


def plot(results, path: str, title: str) -> None:
    """One panel per task: each method's score against its measured transfer ratio, dense as a line."""
    check_output_path(path, "the plot", image=True)
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
        sparse = [r for r in rows if r["method"] != "dense"]
        if len({r["compression"] for r in sparse}) == 1:
            # one ratio: a bar per method (a ratio axis would only spread its measured ratios apart)
            for i, r in enumerate(sparse):
                ax.bar(i, r["score"], color=styles.get(r["method"], ("C7",))[0], label=r["method"])
            ax.set_xticks(range(len(sparse)), [f"{r['method']}\n{r['transfer_ratio']:.3f}" for r in sparse], fontsize=8)
            ax.set_xlabel(f"method and measured transfer ratio (target {sparse[0]['compression']:g})")
            ax.set_ylabel(SCORE_LABEL.get(task, "score"))
            ax.set_title(task)
            ax.grid(alpha=0.3, axis="y")
            if task in ("passkey", "multikey", "needle"):
                ax.set_ylim(0, 1.05)
            continue
        for name in dict.fromkeys(r["method"] for r in sparse):
            pts = sorted((r["transfer_ratio"], r["score"]) for r in rows if r["method"] == name)
            color, marker = styles.get(name, (None, "o"))
            ax.plot(*zip(*pts), marker=marker, color=color, label=name)
        if task in ("passkey", "multikey", "needle"):
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


def plot_needle(rows_by_length: dict, path: str, title: str, methods=None) -> None:
    """Needle-in-a-haystack heatmaps, one per (method, compression): accuracy by depth (rows) and
    context length (columns). rows_by_length: {context_length: result rows holding needle rows}."""
    check_output_path(path, "the plot", image=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted(rows_by_length)
    cells = {}
    for length in lengths:
        for r in rows_by_length[length]:
            if r["task"] == "needle" and (methods is None or r["method"] in methods):
                cells.setdefault((r["method"], r["compression"]), {})[length] = r
    if not cells:
        raise ValueError("no needle rows to plot")
    depths = sorted({d for per in cells.values() for r in per.values() for d in r["by_depth"]}, key=float)
    fig, axes = plt.subplots(1, len(cells), figsize=(2.4 + 1.1 * len(lengths) * len(cells), 3.4), squeeze=False)
    for ax, ((name, ratio), per) in zip(axes[0], cells.items()):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, length in enumerate(lengths):
            if length in per:
                for i, d in enumerate(depths):
                    grid[i, j] = per[length]["by_depth"].get(d, np.nan)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(name if name == "dense" else f"{name} {ratio:g}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
