"""Turn a sweep's runs into its table, figures and CSV files.

    dni-report outputs/multirun/2026-11-22/10-00-00
    dni-report --help       # every option

reads every job's `.hydra/` configs and `metrics.json` (nothing is typed in by hand) and
writes into the sweep folder: `report.md` (the table and the figures), each figure as PNG
and PDF, `summary.csv` (one line per job: its swept values and final metrics) and
`evaluations.csv` (one line per job, metric and evaluation step, for pandas).

By default the table's columns and rows are the keys the sweep varied (from the jobs' Hydra
overrides; `method` first when it was swept), and only `seed` is averaged: a cell shows the
mean ± standard deviation over seeds and their number n, the figures draw it as error bars.
An experiment's `report:` node (rows, columns, title, figures) sets other defaults;
options on the command line override both. Every sweep makes its report when it ends
(`dni.cli.callbacks.SweepReport`). Failed, diverged and unfinished jobs are marked in
their cells, never dropped silently.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
import textwrap
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dni.cli.sweep import swept_keys
from dni.tracking import read_metrics

# One colour per learning rule, the same in every figure.
COLORS = {
    "bprop": "black",
    "no_bprop": "tab:olive",
    "bptt": "black",
    "dni": "tab:blue",
    "cdni": "tab:orange",
    "rnn_dni": "tab:blue",
    "dni_aux": "tab:purple",
    "backward_net": "tab:gray",
    "fa": "tab:green",
    "dfa": "tab:red",
    "cdni_unlocked": "tab:brown",
    "dni_unlocked": "tab:cyan",
}
MARKS = {"failed": "failed", "diverged": "diverged", "running": "unfinished", "missing": "unfinished"}
# The keys a report averages over; every other key the sweep varied gets its own row or column.
AVERAGED = ("seed",)
FEW_POINTS = 12  # a curve with at most this many points marks each one


def _option(default: Any, text: str, **more: Any) -> Any:
    """A field of `ReportSpec` with the help text `--help` shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text, **more})
    return field(default=default, metadata={"help": text, **more})


@dataclass
class ReportSpec:
    """What a report shows. Keys name a `metrics.json` field (`test_error`, `final.test/loss`),
    a config group's choice (`method`) or a dotted config key (`model.depth`)."""

    title: str | None = _option(
        None,
        "the title of the report and its figures; {key} in it stands for the runs' values of that "
        "key, e.g. {dataset} (default: the experiment's name and the swept keys)",
    )
    rows: str | None = _option(
        None,
        "the key whose values are the table's rows and the curves' panels "
        "(default: the second swept key; one row when the sweep varies one key)",
    )
    columns: str | None = _option(
        None,
        "the key whose values are the table's columns and the figures' lines; several keys joined "
        "by commas, e.g. method,synthesizer (default: the first swept key, method when swept; swept "
        "keys that are neither rows nor columns are added here, so that only seed is averaged)",
    )
    value: str = _option("test_error", "what a cell shows: a metrics.json field")
    scale: float = _option(100.0, "factor applied to the value, e.g. 100 for an error rate in percent")
    label: str = _option("test error (%)", "what the scaled value is, for axes and the table's caption")
    digits: int = _option(2, "decimals in the table")
    curves: str | None = _option(
        "test/error", "a logged tag drawn over training steps, one panel per row (none: no curves figure)"
    )
    versus: str | None = _option(None, "a config key: a figure of the value against it, one line per column")
    log_x: bool = _option(False, "logarithmic x axis for the versus figure", flag=True)
    lower_is_better: bool = _option(
        True, "the value is an error or loss (a log scale when it spans a decade)", flag=True
    )
    order: list[str] = _option([], "column values to put first, in this order (comma-separated)")
    # Diagnostics over training, e.g. ["sg/cosine", "drift"]: for each, a figure with one panel
    # per column and one line per interface or block (`sg/cosine/block2`, ...), at the deepest
    # row; read from the runs' TensorBoard events (set trainer.diagnostics_every).
    traces: list[str] = _option(
        [], "diagnostic tag prefixes, e.g. sg/cosine,drift: a figure each, a line per block (comma-separated)"
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ReportSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def resolved(self, runs: list[Run]) -> ReportSpec:
        """This spec with what it leaves open decided by the sweep: rows and columns from the
        keys the jobs' overrides vary, every varied key but `seed` a row or column, a title."""
        varied = [k for k in sweep_keys(runs) if k not in AVERAGED]
        columns, rows = self.columns, self.rows
        if columns is None:
            rest = [k for k in varied if k != rows]
            columns = "method" if "method" in rest else (rest[0] if rest else None)
        if rows is None:
            rest = [k for k in varied if k not in _keys(columns)]
            rows = rest[0] if rest else None
        shown = _keys(rows) + _keys(columns)
        extra = [k for k in varied if k not in shown]
        if extra:
            columns = ",".join(_keys(columns) + extra)
        title = _filled(self.title, runs)
        if title is None:
            experiment = next(
                (r.choices.get("experiment") for r in runs if r.choices.get("experiment")), None
            )
            by = f" by {', '.join(varied)}" if varied else ""
            title = f"{experiment or 'sweep'}: {self.label}{by}"
        return replace(self, rows=rows, columns=columns, title=title)


def _filled(title: str | None, runs: list[Run]) -> str | None:
    """`{key}` in a title replaced by the runs' values of that key, so that one experiment run
    on several data sets titles each report by its own ("Table 1: {dataset}, FCN")."""
    if title is None:
        return None

    def values(match: re.Match) -> str:
        found = {run.lookup(match.group(1)) for run in runs} - {None}
        return ", ".join(str(v) for v in sorted(found, key=_sort_key)) if found else match.group(0)

    return re.sub(r"\{([\w./-]+)\}", values, title)


def _keys(joined: str | None) -> list[str]:
    return [k.strip() for k in joined.split(",")] if joined else []


@dataclass
class Run:
    """One job of a sweep: its folder, composed config and metrics (None if it never wrote any)."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    choices: dict[str, Any] = field(default_factory=dict)  # Hydra's group choices, e.g. method: cdni
    overrides: list[str] = field(default_factory=list)  # the job's Hydra overrides, e.g. method=cdni

    @property
    def status(self) -> str:
        return (self.metrics or {}).get("status", "missing")

    def lookup(self, key: str | None) -> Any:
        """A `metrics.json` field (also dotted into it, e.g. "final.test/level"), else a config
        group's choice (e.g. "method"), else a dotted key of the config (e.g. "model.depth");
        None when absent or not a single value. Several keys joined by commas give their
        values joined by " / " (e.g. "cdni / mlp"). No key (a report of one row): "all"."""
        if key is None:
            return "all"
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


def sweep_keys(runs: list[Run]) -> list[str]:
    """The keys the jobs' overrides set to different values, in the order they were given."""
    return swept_keys([run.overrides for run in runs])


def collect(sweep_dir: str | Path) -> list[Run]:
    """Every job folder under `sweep_dir` (any depth) that holds `.hydra/config.yaml`."""
    runs = []
    for config_file in sorted(Path(sweep_dir).glob("**/.hydra/config.yaml")):
        folder = config_file.parent.parent
        hydra_file = config_file.with_name("hydra.yaml")
        hydra = yaml.safe_load(hydra_file.read_text()) if hydra_file.exists() else {}
        choices = ((hydra or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
        overrides_file = config_file.with_name("overrides.yaml")
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        config = yaml.safe_load(config_file.read_text()) or {}
        runs.append(Run(folder, config, read_metrics(folder), choices, overrides or []))
    return runs


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _columns(runs: list[Run], spec: ReportSpec) -> list[Any]:
    """The columns, `spec.order` first; a joined column ("cdni / cifar10", a key the sweep varied
    besides the experiment's columns) takes the place of its first part ("cdni")."""
    present = {run.lookup(spec.columns) for run in runs}
    place = {value: i for i, value in enumerate(spec.order)}

    def rank(column: Any) -> tuple:
        first = str(column).partition(" / ")[0]
        return (place.get(column, place.get(first, len(place))), _sort_key(column))

    return sorted(present, key=rank)


def _rows(runs: list[Run], spec: ReportSpec) -> list[Any]:
    return sorted({run.lookup(spec.rows) for run in runs}, key=_sort_key)


def cells(runs: list[Run], spec: ReportSpec) -> dict[tuple[Any, Any], list[Run]]:
    grouped: dict[tuple[Any, Any], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(run.lookup(spec.rows), run.lookup(spec.columns))].append(run)
    return grouped


def _values(group: list[Run], spec: ReportSpec) -> list[float]:
    """The scaled values of the completed, finite runs of a cell."""
    values = [run.lookup(spec.value) for run in group if run.status == "completed"]
    return [v * spec.scale for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def format_cell(group: list[Run], spec: ReportSpec) -> str:
    """Mean (± standard deviation over seeds, and their number n) of the completed runs;
    otherwise why not."""
    values = _values(group, spec)
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
    spec = spec.resolved(runs)
    grouped = cells(runs, spec)
    columns = _columns(runs, spec)
    lines = [
        f"| {spec.rows or spec.columns or ''} | " + " | ".join(str(c) for c in columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in _rows(runs, spec):
        lines.append(
            f"| {row} | " + " | ".join(format_cell(grouped.get((row, c), []), spec) for c in columns) + " |"
        )
    return "\n".join(lines)


# Figures: one style for all, sized for a paper (a column is 3.4 in wide, a page 7 in), with
# fonts that stay legible there, legends outside the data, and a colour per learning rule.
COLUMN_WIDTH, PAGE_WIDTH = 3.4, 7.0
STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "figure.titlesize": 9,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # fonts a journal's PDF checker accepts
}


@contextmanager
def _figure_style() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        yield plt


def _save(fig: Any, path: Path) -> Path:
    """`path` as PNG, and the same figure beside it as PDF."""
    fig.savefig(path)
    fig.savefig(path.with_suffix(".pdf"))
    return path


def _wrapped(title: str, width_in: float) -> str:
    """A title broken into lines that fit the figure's width (at `figure.titlesize`)."""
    per_line = max(20, int(width_in * 72 / (0.55 * STYLE["figure.titlesize"])))
    return textwrap.fill(title, per_line)


def _legend(fig: Any, axes: list[Any], title: str | None) -> None:
    """One legend below the panels, outside the data, an entry per line."""
    handles, labels = {}, []
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        ncol = min(len(labels), 4 if fig.get_figwidth() > COLUMN_WIDTH + 0.1 else 2)
        fig.legend([handles[k] for k in labels], labels, loc="outside lower center", ncol=ncol, title=title)


def _styles(columns: list[Any]) -> dict[Any, dict[str, Any]]:
    """Colour and dash of each column's line: the colour follows the learning rule (the first
    part of a joined column, as in every figure; others take the palette in turn), the dash
    the rest ("cdni / mlp")."""
    rests = list(dict.fromkeys(str(c).partition(" / ")[2] for c in columns))
    firsts = list(dict.fromkeys(str(c).partition(" / ")[0] for c in columns))
    dashes = ["-", "--", ":", "-."]
    return {
        c: {
            "color": COLORS.get(
                str(c).partition(" / ")[0], f"C{firsts.index(str(c).partition(' / ')[0]) % 10}"
            ),
            "linestyle": dashes[rests.index(str(c).partition(" / ")[2]) % len(dashes)],
        }
        for c in columns
    }


def _mean_curve(runs: list[Run], tag: str, scale: float) -> tuple[list[int], list[float], list[float], int]:
    """Steps, mean and standard deviation over the runs (seeds) of `tag`'s history, and how
    many runs had one."""
    at: dict[int, list[float]] = defaultdict(list)
    n = 0
    for run in runs:
        points = ((run.metrics or {}).get("history") or {}).get(tag) or []
        points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
        n += bool(points)
        for step, value in points:
            at[step].append(value * scale)
    steps = sorted(at)
    means = [statistics.fmean(at[s]) for s in steps]
    stds = [statistics.stdev(at[s]) if len(at[s]) > 1 else 0.0 for s in steps]
    return steps, means, stds, n


def _draw(
    axis: Any, xs: list, means: list[float], stds: list[float], n: int, label: str, style: dict
) -> None:
    """A line with a marker at each point when there are few, and error bars (± one standard
    deviation over seeds) when it is a mean over several runs."""
    marker = "o" if len(xs) <= FEW_POINTS else None
    label = f"{label} (n={n})" if n > 1 else label
    if n > 1:
        axis.errorbar(xs, means, yerr=stds, marker=marker, capsize=2, label=label, **style)
    else:
        axis.plot(xs, means, marker=marker, label=label, **style)


def _error_scale(axis: Any, values: list[float]) -> None:
    """A log y axis with plain tick labels when an error spans more than a decade."""
    import matplotlib.ticker as ticker

    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(ticker.ScalarFormatter())
        axis.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_curves(runs: list[Run], spec: ReportSpec, path: Path) -> Path | None:
    """`spec.curves` over training steps: one panel per row value, one line per column (the
    mean over seeds, with error bars)."""
    spec = spec.resolved(runs)
    rows, columns = _rows(runs, spec), _columns(runs, spec)
    styles = _styles(columns)
    width = min(PAGE_WIDTH, max(COLUMN_WIDTH, 2.3 * len(rows)))
    with _figure_style() as plt:
        fig, axes = plt.subplots(
            1, len(rows), figsize=(width, 2.6), squeeze=False, sharey=True, layout="constrained"
        )
        drawn: list[float] = []
        for axis, row in zip(axes[0], rows):
            for column in columns:
                mine = [r for r in runs if r.lookup(spec.rows) == row and r.lookup(spec.columns) == column]
                steps, means, stds, n = _mean_curve(mine, spec.curves, spec.scale)
                if steps:
                    _draw(axis, steps, means, stds, n, str(column), styles[column])
                    drawn += means
            if spec.rows:
                axis.set_title(f"{spec.rows} = {row}")
            axis.set_xlabel("training step")
        if not drawn:
            plt.close(fig)
            return None
        axes[0][0].set_ylabel(spec.label)
        if spec.lower_is_better:
            _error_scale(axes[0][0], drawn)
        _legend(fig, list(axes[0]), spec.columns)
        fig.suptitle(_wrapped(spec.title, width))
        _save(fig, path)
        plt.close(fig)
    return path


def plot_versus(runs: list[Run], spec: ReportSpec, path: Path) -> Path | None:
    """The final `spec.value` against the config key `spec.versus`, one line per column (the
    mean over seeds, with error bars)."""
    spec = spec.resolved(runs)
    columns = _columns(runs, spec)
    styles = _styles(columns)
    with _figure_style() as plt:
        fig, axis = plt.subplots(figsize=(COLUMN_WIDTH, 2.8), layout="constrained")
        xs_all: set = set()
        for column in columns:
            points: dict[Any, list[Run]] = defaultdict(list)
            for run in runs:
                if run.lookup(spec.columns) == column:
                    points[run.lookup(spec.versus)].append(run)
            xs = [x for x in sorted(points, key=_sort_key) if _values(points[x], spec)]
            if not xs:
                continue
            values = [_values(points[x], spec) for x in xs]
            means = [statistics.fmean(v) for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            _draw(axis, xs, means, stds, max(len(v) for v in values), str(column), styles[column])
            xs_all.update(xs)
        if not xs_all:
            plt.close(fig)
            return None
        import matplotlib.ticker as ticker

        if spec.log_x:
            axis.set_xscale("log")
        axis.set_xticks(sorted(xs_all, key=_sort_key))
        axis.xaxis.set_major_formatter(ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel(spec.versus)
        axis.set_ylabel(spec.label)
        _legend(fig, [axis], spec.columns)
        fig.suptitle(_wrapped(spec.title, COLUMN_WIDTH))
        _save(fig, path)
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
    spec = spec.resolved(runs)
    row = max((run.lookup(spec.rows) for run in runs), key=_sort_key, default=None)
    grouped = cells(runs, spec)
    shown = [(c, grouped[(row, c)][0]) for c in _columns(runs, spec) if grouped.get((row, c))]
    series = [(c, scalars(run.path, prefix)) for c, run in shown]
    series = [(c, s) for c, s in series if s]
    if not series:
        return None
    per_row = min(len(series), 4)
    grid_rows = math.ceil(len(series) / per_row)
    with _figure_style() as plt:
        fig, axes = plt.subplots(
            grid_rows,
            per_row,
            figsize=(min(PAGE_WIDTH, 1.9 * per_row + 0.4), 1.8 * grid_rows + 0.6),
            squeeze=False,
            sharey=True,
            sharex=True,
            layout="constrained",
        )
        flat = [axis for line in axes for axis in line]
        for axis, (column, traces) in zip(flat, series):
            tags = sorted(traces, key=lambda t: (len(t), t))
            for i, tag in enumerate(tags):
                steps, values = zip(*traces[tag])
                shade = plt.cm.viridis(0.85 * (1 - i / max(len(tags) - 1, 1)))
                marker = "." if len(steps) <= FEW_POINTS * 4 else None
                axis.plot(steps, values, color=shade, marker=marker, label=tag.removeprefix(prefix + "/"))
            axis.set_title(str(column))
        for axis in flat[len(series) :]:
            axis.set_visible(False)
        for axis in axes[-1]:
            axis.set_xlabel("training step")
        for line in axes:
            line[0].set_ylabel(prefix)
        _legend(fig, flat, None)
        where = f", {spec.rows} = {row}" if spec.rows else ""
        fig.suptitle(_wrapped(f"{prefix} over training{where}", fig.get_figwidth()))
        _save(fig, path)
        plt.close(fig)
    return path


# What summary.csv holds of each job's metrics.json, after its folder, status and swept values.
SUMMARY_FIELDS = (
    "test_error",
    "best_test_error",
    "test_loss",
    "steps",
    "total_steps",
    "wall_time_s",
    "samples_per_s",
    "skipped_updates",
    "error",
)


def write_csvs(runs: list[Run], sweep_dir: Path) -> tuple[Path, Path]:
    """`summary.csv`, a line per job with its swept values and final metrics, and
    `evaluations.csv`, a line per job, metric and evaluation step (long form, for pandas)."""
    keys = sweep_keys(runs)
    summary, evaluations = sweep_dir / "summary.csv", sweep_dir / "evaluations.csv"
    with summary.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["job", "status", *keys, *SUMMARY_FIELDS])
        for run in runs:
            metrics = run.metrics or {}
            errors = [v for _, v in (metrics.get("history") or {}).get("test/error", []) if v is not None]
            derived = {"best_test_error": min(errors) if errors else None}
            values = [derived.get(name, metrics.get(name)) for name in SUMMARY_FIELDS]
            writer.writerow([run.path.name, run.status, *(run.lookup(k) for k in keys), *_cells(values)])
    with evaluations.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["job", "status", *keys, "metric", "step", "value"])
        for run in runs:
            history = (run.metrics or {}).get("history") or {}
            swept = [run.lookup(k) for k in keys]
            for tag, points in history.items():
                for step, value in points:
                    writer.writerow([run.path.name, run.status, *swept, tag, step, *_cells([value])])
    return summary, evaluations


def _cells(values: list[Any]) -> list[Any]:
    return ["" if v is None else v for v in values]


def make_report(sweep_dir: str | Path, spec: ReportSpec | None = None) -> Path:
    """Write `report.md` (the table, the figures, the status of every job), the figures and
    the CSV files into `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    runs = collect(sweep_dir)
    if not runs:
        raise SystemExit(f"no runs under {sweep_dir}; give a sweep's folder, outputs/multirun/<date>/<time>")
    spec = (spec or ReportSpec.from_dict(runs[0].config.get("report"))).resolved(runs)
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
    write_csvs(runs, sweep_dir)
    statuses = Counter(run.status for run in runs)
    jobs = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    averaged = [k for k in sweep_keys(runs) if k in AVERAGED]
    over = f"; mean ± standard deviation over {', '.join(averaged)} (n runs)" if averaged else ""
    lines = [
        f"# {spec.title}",
        "",
        f"Cells: {spec.label} ({spec.value}){over}; {len(runs)} jobs: {jobs}.",
        "",
        table,
        "",
    ]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    lines += ["", "Every job's final metrics: `summary.csv`; every evaluation: `evaluations.csv`."]
    report = sweep_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dni-report",
        description=textwrap.fill(
            __doc__.split("\n\n", 1)[0].strip() + " Writes report.md, the figures (PNG and PDF), "
            "summary.csv and evaluations.csv into the sweep folder.",
            88,
        ),
        epilog=__doc__.split("\n\n", 2)[2].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="the sweep's folder, e.g. outputs/multirun/<date>/<time>"
    )
    for f in fields(ReportSpec):
        text = f.metadata["help"].replace("%", "%%")
        if f.metadata.get("flag"):
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", dest=f.name, action=argparse.BooleanOptionalAction, help=text
            )
        elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            parser.add_argument(
                f"--{f.name}",
                type=type(f.default),
                metavar=type(f.default).__name__.upper(),
                help=f"{text} (default {f.default})",
            )
        else:
            shown = f" (default {f.default})".replace("%", "%%") if isinstance(f.default, str) else ""
            parser.add_argument(
                f"--{f.name}",
                metavar="KEY" if f.name in ("rows", "columns", "versus") else "TEXT",
                help=text + shown,
            )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(
            f"{args.sweep_dir} is not a folder; give a sweep's folder, outputs/multirun/<date>/<time>"
        )
    runs = collect(args.sweep_dir)
    base = ReportSpec.from_dict(runs[0].config.get("report") if runs else None)
    given = {f.name: getattr(args, f.name, None) for f in fields(ReportSpec)}
    overrides = {k: v for k, v in given.items() if v is not None}
    for key in ("order", "traces"):
        if key in overrides:
            overrides[key] = _keys(overrides[key])
    for key in ("curves", "versus", "title"):  # `--curves none`: no such figure
        if key in overrides and str(overrides[key]).lower() in ("none", "null"):
            overrides[key] = None
    spec = replace(base, **overrides)
    print(make_report(args.sweep_dir, spec).read_text())  # the table is this command's output


def cli() -> None:
    """The `dni-report` command."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
