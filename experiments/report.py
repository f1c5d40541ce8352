"""Turn a sweep's runs into the paper's table and figures.

    python experiments/report.py outputs/multirun/2026-11-22/10-00-00

reads every job's `.hydra/config.yaml` and `metrics.json` (nothing is typed in by hand),
and writes `report.md` and PNG figures into the sweep folder. What to tabulate comes
from the `report:` node of the experiment that made the sweep (rows, columns, value,
figures); options on the command line override it. Sweeps run with an experiment that
has a `report:` node make their report by themselves when they finish (`Report` below is
the Hydra callback that does it). Failed, diverged and unfinished jobs are marked in
their cells, never dropped silently.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dni.tracking import read_metrics

# One colour per learning rule, the same in every figure.
COLORS = {
    "bprop": "black",
    "no_bprop": "tab:olive",
    "bptt": "black",
    "dni": "tab:blue",
    "cdni": "tab:orange",
    "dni_aux": "tab:purple",
    "backward_net": "tab:gray",
    "fa": "tab:green",
    "dfa": "tab:red",
    "cdni_unlocked": "tab:brown",
    "dni_unlocked": "tab:cyan",
}
MARKS = {"failed": "failed", "diverged": "diverged", "running": "unfinished", "missing": "unfinished"}


@dataclass
class ReportSpec:
    """What a report shows. Keys name a `metrics.json` field or a dotted config key."""

    title: str = "Results"
    rows: str = "model.depth"
    columns: str = "method"  # one key, or several joined by commas: "method,synthesizer"
    value: str = "test_error"
    scale: float = 100.0  # e.g. 100 for an error rate in percent
    label: str = "test error (%)"  # what the scaled value is, for axes
    digits: int = 2
    curves: str | None = "test/error"  # a history tag: figure of it over steps, per column
    versus: str | None = None  # a config key: figure of `value` against it, per column
    log_x: bool = False
    lower_is_better: bool = True
    order: list[str] = field(default_factory=list)  # column order; others follow
    # Diagnostics over training, e.g. ["sg/cosine", "drift"]: for each, a figure with one panel
    # per column and one line per interface or block (`sg/cosine/block2`, ...), at the deepest
    # row; read from the runs' TensorBoard events (set trainer.diagnostics_every).
    traces: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ReportSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


@dataclass
class Run:
    """One job of a sweep: its folder, composed config and metrics (None if it never wrote any)."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    choices: dict[str, Any] = field(default_factory=dict)  # Hydra's group choices, e.g. method: cdni

    @property
    def status(self) -> str:
        return (self.metrics or {}).get("status", "missing")

    def lookup(self, key: str) -> Any:
        """A `metrics.json` field (also dotted into it, e.g. "final.test/level"), else a config
        group's choice (e.g. "method"), else a dotted key of the config (e.g. "model.depth");
        None when absent or not a single value. Several keys joined by commas give their
        values joined by " / " (e.g. "cdni / mlp")."""
        if "," in key:
            values = [self.lookup(part.strip()) for part in key.split(",")]
            return None if all(v is None for v in values) else " / ".join(str(v) for v in values)
        if self.metrics and key in self.metrics:
            return self.metrics[key]
        head, _, rest = key.partition(".")  # e.g. "final.test/level": a metric's last logged value
        if self.metrics and isinstance(self.metrics.get(head), dict) and rest in self.metrics[head]:
            return self.metrics[head][rest]
        if key in self.choices:
            return self.choices[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return None if isinstance(node, (dict, list)) else node


def collect(sweep_dir: str | Path) -> list[Run]:
    """Every job folder under `sweep_dir` (any depth) that holds `.hydra/config.yaml`."""
    runs = []
    for config_file in sorted(Path(sweep_dir).glob("**/.hydra/config.yaml")):
        folder = config_file.parent.parent
        hydra_file = config_file.with_name("hydra.yaml")
        hydra = yaml.safe_load(hydra_file.read_text()) if hydra_file.exists() else {}
        choices = ((hydra or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
        runs.append(Run(folder, yaml.safe_load(config_file.read_text()) or {}, read_metrics(folder), choices))
    return runs


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _columns(runs: list[Run], spec: ReportSpec) -> list[Any]:
    present = {run.lookup(spec.columns) for run in runs}
    ordered = [c for c in spec.order if c in present]
    return ordered + sorted(present - set(ordered), key=_sort_key)


def cells(runs: list[Run], spec: ReportSpec) -> dict[tuple[Any, Any], list[Run]]:
    grouped: dict[tuple[Any, Any], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(run.lookup(spec.rows), run.lookup(spec.columns))].append(run)
    return grouped


def format_cell(group: list[Run], spec: ReportSpec) -> str:
    """Mean (± standard deviation over seeds) of the completed runs; otherwise why not."""
    values = [run.lookup(spec.value) for run in group if run.status == "completed"]
    values = [v * spec.scale for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    problems = sorted({MARKS.get(run.status, run.status) for run in group if run.status != "completed"})
    if not values:
        return ", ".join(problems) or "–"
    text = f"{statistics.fmean(values):.{spec.digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{spec.digits}f} (n={len(values)})"
    if problems:
        text += f" ({', '.join(problems)} too)"
    return text


def markdown_table(runs: list[Run], spec: ReportSpec) -> str:
    grouped = cells(runs, spec)
    columns = _columns(runs, spec)
    rows = sorted({run.lookup(spec.rows) for run in runs}, key=_sort_key)
    lines = [
        f"| {spec.rows} | " + " | ".join(str(c) for c in columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append(
            f"| {row} | " + " | ".join(format_cell(grouped.get((row, c), []), spec) for c in columns) + " |"
        )
    return "\n".join(lines)


def _styles(columns: list[Any]) -> dict[Any, dict[str, str]]:
    """Colour and dash of each column's line: the colour follows the learning rule (the first
    part of a joined column, as in every figure), the dash the rest ("cdni / mlp")."""
    rests = list(dict.fromkeys(str(c).partition(" / ")[2] for c in columns))
    dashes = ["-", "--", ":", "-."]
    return {
        c: {
            "color": COLORS.get(str(c).partition(" / ")[0], f"C{i % 10}"),
            "linestyle": dashes[rests.index(str(c).partition(" / ")[2]) % len(dashes)],
        }
        for i, c in enumerate(columns)
    }


def plot_curves(runs: list[Run], spec: ReportSpec, path: Path) -> Path | None:
    """`spec.curves` over training steps: one panel per row value, one colour per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({run.lookup(spec.rows) for run in runs}, key=_sort_key)
    columns = _columns(runs, spec)
    styles = _styles(columns)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False, sharey=True)
    drawn = False
    for axis, row in zip(axes[0], rows):
        for column in columns:
            mine = [r for r in runs if r.lookup(spec.rows) == row and r.lookup(spec.columns) == column]
            for j, run in enumerate(mine):
                points = ((run.metrics or {}).get("history") or {}).get(spec.curves) or []
                if not points:
                    continue
                steps, values = zip(*points)
                axis.plot(
                    steps,
                    [v * spec.scale for v in values],
                    **styles[column],
                    label=str(column) if j == 0 else None,
                    alpha=0.9 if j == 0 else 0.5,
                )
                drawn = True
        axis.set_title(f"{spec.rows} = {row}")
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][0].set_ylabel(spec.label)
    if spec.lower_is_better:  # errors shrink by orders of magnitude; keep plain tick labels
        axis = axes[0][0]
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][-1].legend(title=spec.columns)
    fig.suptitle(spec.title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_versus(runs: list[Run], spec: ReportSpec, path: Path) -> Path | None:
    """The final `spec.value` against the config key `spec.versus`, one line per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.8))
    drawn = False
    columns = _columns(runs, spec)
    styles = _styles(columns)
    for column in columns:
        points: dict[Any, list[float]] = defaultdict(list)
        for run in runs:
            value = run.lookup(spec.value)
            if run.lookup(spec.columns) == column and run.status == "completed" and value is not None:
                points[run.lookup(spec.versus)].append(value * spec.scale)
        if points:
            xs = sorted(points, key=_sort_key)
            means = [statistics.fmean(points[x]) for x in xs]
            axis.plot(xs, means, marker="o", **styles[column], label=str(column))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if spec.log_x:
        axis.set_xscale("log")
    axis.set_xticks(sorted({x for line in axis.get_lines() for x in line.get_xdata()}))
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel(spec.versus)
    axis.set_ylabel(spec.label)
    axis.set_title(spec.title, fontsize=10, wrap=True)
    axis.grid(alpha=0.3)
    axis.legend(title=spec.columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard events whose tag starts with `prefix/`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith(prefix + "/")]
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


def plot_traces(runs: list[Run], spec: ReportSpec, prefix: str, path: Path) -> Path | None:
    """`prefix/<where>` over training at the deepest row: a panel per column, a line per
    interface or block (darker = deeper), the first completed run (seed) of each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = max((run.lookup(spec.rows) for run in runs), key=_sort_key, default=None)
    grouped = cells(runs, spec)
    shown = [(c, grouped[(row, c)][0]) for c in _columns(runs, spec) if grouped.get((row, c))]
    series = [(c, scalars(run.path, prefix)) for c, run in shown]
    series = [(c, s) for c, s in series if s]
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.4), squeeze=False, sharey=True)
    for axis, (column, traces) in zip(axes[0], series):
        tags = sorted(traces, key=lambda t: (len(t), t))
        for i, tag in enumerate(tags):
            steps, values = zip(*traces[tag])
            shade = plt.cm.viridis(0.85 * (1 - i / max(len(tags) - 1, 1)))
            axis.plot(steps, values, color=shade, marker=".", label=tag.removeprefix(prefix + "/"))
        axis.set_title(str(column), fontsize=9)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(prefix)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{prefix} over training, {spec.rows} = {row}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(sweep_dir: str | Path, spec: ReportSpec | None = None) -> Path:
    """Write `report.md` (the table, the figures, the status of every job) into `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    runs = collect(sweep_dir)
    if not runs:
        raise SystemExit(f"no runs under {sweep_dir}; give a sweep's folder, outputs/multirun/<date>/<time>")
    spec = spec or ReportSpec.from_dict(runs[0].config.get("report"))
    table = markdown_table(runs, spec)
    figures = [
        f
        for f in (
            plot_curves(runs, spec, sweep_dir / "curves.png") if spec.curves else None,
            plot_versus(runs, spec, sweep_dir / "versus.png") if spec.versus else None,
            *(plot_traces(runs, spec, p, sweep_dir / f"{p.replace('/', '_')}.png") for p in spec.traces),
        )
        if f is not None
    ]
    statuses = Counter(run.status for run in runs)
    jobs = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    lines = [
        f"# {spec.title}",
        "",
        f"Cells: {spec.label} ({spec.value}); {len(runs)} jobs: {jobs}.",
        "",
        table,
        "",
    ]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    report = sweep_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    for f in fields(ReportSpec):
        if f.name not in ("order", "log_x", "lower_is_better", "traces"):
            parser.add_argument(f"--{f.name}", type=type(f.default) if f.default is not None else str)
    args = parser.parse_args(argv)
    runs = collect(args.sweep_dir)
    base = ReportSpec.from_dict(runs[0].config.get("report") if runs else None)
    given = {f.name: getattr(args, f.name, None) for f in fields(ReportSpec)}
    overrides = {k: v for k, v in given.items() if v is not None}
    spec = ReportSpec.from_dict({**base.__dict__, **overrides})
    print(make_report(args.sweep_dir, spec).read_text())  # the table is this command's output


if __name__ == "__main__":
    main(sys.argv[1:])
