"""The table and figure scripts, on tiny real sweeps made here through the joblib launcher."""

from __future__ import annotations

import matplotlib.image

from dni.cli.report import ReportSpec, Run, collect, main, markdown_table
from tests.helpers import run_cli

TINY = [
    "dataset=synthetic",
    "dataset.num_train=256",
    "dataset.num_test=64",
    "trainer.steps=6",
    "trainer.batch_size=32",
    "trainer.eval_every=3",
    "trainer.log_every=3",
    "device=cpu",
]


def _png(path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_table1_sweep_writes_its_table_and_curves(tmp_path):
    result = run_cli(
        "-m",
        "experiment=table1_fcn",
        "method=bprop,cdni",
        "model.depth=1,2",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "# Table 1: synthetic, FCN, test error (%)" in report and "4 completed" in report
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert rows[0] == "| model.depth | bprop | cdni |" and len(rows) == 2 + 2
    for line in rows[2:]:  # every cell a number, as the runs' own metrics say
        assert all(float(cell) >= 0 for cell in line.strip("| ").split(" | ")[1:])
    height, width, _ = _png(tmp_path / "curves.png")
    assert width > 600 and height > 300

    runs = collect(tmp_path)
    cdni_depth1 = next(r for r in runs if r.lookup("method") == "cdni" and r.lookup("model.depth") == 1)
    assert f"{100 * cdni_depth1.metrics['test_error']:.2f}" in rows[2]

    (tmp_path / "curves.png").unlink()  # the script alone keeps the experiment's title and curves
    main([str(tmp_path)])
    assert (tmp_path / "curves.png").exists() and (tmp_path / "report.md").read_text() == report


def test_one_experiment_swept_over_data_sets_names_reports_and_groups_each_data_set(tmp_path):
    """`experiment=table1_fcn dataset=A,B`: a folder per job naming its data set, the title
    naming both, and a column per method and data set whose cells are that job's own result."""
    result = run_cli(
        "-m",
        "experiment=table1_fcn",
        "method=bprop,cdni",
        "model.depth=1",
        "dataset=synthetic,next_character",  # two data sets that are offline and take num_train
        # `++`: the sweep's own config has the experiment's data set (MNIST), which lacks them
        *[f"++{o}" if o.startswith("dataset.") else o for o in TINY if not o.startswith("dataset=")],
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    assert names == [
        "0_method=bprop,dataset=synthetic",
        "1_method=bprop,dataset=next_character",
        "2_method=cdni,dataset=synthetic",
        "3_method=cdni,dataset=next_character",
    ]
    # A run's data set is the name it recorded (`metrics.json`), that of the data it loaded.
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Table 1: synthetic, tinyshakespeare_next_character, FCN, test error (%)\n")
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    data = ["synthetic", "tinyshakespeare_next_character"]
    columns = [f"{method} / {name}" for method in ("bprop", "cdni") for name in data]
    assert rows[0] == f"| model.depth | {' | '.join(columns)} |" and len(rows) == 3
    cells = rows[2].strip("| ").split(" | ")[1:]
    for run in collect(tmp_path):
        chosen = next(o for o in run.overrides if o.startswith("dataset=")).partition("=")[2]
        assert run.lookup("dataset") == data[["synthetic", "next_character"].index(chosen)]
        column = columns.index(f"{run.lookup('method')} / {run.lookup('dataset')}")
        assert cells[column] == f"{100 * run.metrics['test_error']:.2f}"


def test_update_frequency_sweep_plots_error_against_p(tmp_path):
    result = run_cli(
        "-m",
        "experiment=update_frequency",
        "method.p_update=1.0,0.1",
        "model.depth=2",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    assert "| method.p_update | cdni |" in (tmp_path / "report.md").read_text()
    _png(tmp_path / "versus.png")


def test_report_script_regenerates_and_marks_unfinished_jobs(tmp_path, capsys):
    result = run_cli("-m", "debug=fast", "method=bprop,dni", "model.depth=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    killed = next(r for r in collect(tmp_path) if r.lookup("method") == "dni")
    (killed.path / "metrics.json").unlink()  # as if the job were killed before it wrote anything
    main([str(tmp_path), "--rows", "model.depth", "--title", "Again"])
    printed = capsys.readouterr().out
    assert "# Again" in printed and "unfinished" in printed and (tmp_path / "curves.png").exists()
    table = markdown_table(collect(tmp_path), ReportSpec(rows="model.depth"))
    assert table.splitlines()[0] == "| model.depth | bprop | dni |"


def test_columns_of_several_keys_join_their_values(tmp_path):
    result = run_cli(
        "-m",
        "experiment=synthesizers",
        "method=bprop,cdni",
        "synthesizer=linear,mlp",
        "model.depth=1",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == "| model.depth | bprop / linear | bprop / mlp | cdni / linear | cdni / mlp |"
    cells = rows[2].strip("| ").split(" | ")[1:]
    assert len(cells) == 4 and cells[0] == cells[1]  # bprop ignores the synthesizer: the same run twice
    _png(tmp_path / "curves.png")


def test_an_ad_hoc_sweep_over_lr_and_seed_gets_a_column_per_lr_averaged_over_seeds_only(tmp_path):
    import csv
    import statistics

    result = run_cli(
        "-m", "debug=fast", "optim.lr=0.001,0.01", "seed=0,1", "trainer.progress=false", "device=cpu",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert rows[0] == "| optim.lr | 0.001 | 0.01 |" and len(rows) == 3  # a column per learning rate
    errors = {lr: [] for lr in (0.001, 0.01)}
    for run in collect(tmp_path):
        errors[run.lookup("optim.lr")].append(100 * run.metrics["test_error"])
    expected = [f"{statistics.fmean(e):.2f} ± {statistics.stdev(e):.2f} (n=2)" for e in errors.values()]
    assert rows[2] == f"| all | {expected[0]} | {expected[1]} |"  # the two seeds of each rate
    assert report.startswith("# sweep: test error (%) by optim.lr\n")
    assert "mean ± standard deviation over seed" in report
    _png(tmp_path / "curves.png")
    assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"

    with (tmp_path / "summary.csv").open() as file:
        summary = list(csv.DictReader(file))
    assert sorted((float(r["optim.lr"]), int(r["seed"])) for r in summary) == [
        (0.001, 0), (0.001, 1), (0.01, 0), (0.01, 1)
    ]  # fmt: skip
    assert all(r["status"] == "completed" and r["steps"] == "20" for r in summary)
    with (tmp_path / "evaluations.csv").open() as file:
        evaluations = list(csv.DictReader(file))
    test_errors = [r for r in evaluations if r["metric"] == "test/error"]
    assert len(test_errors) == 4 * 2  # 4 jobs, evaluated at steps 10 and 20
    assert {r["job"] for r in test_errors} == {r["job"] for r in summary}


def test_the_report_script_explains_every_option(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--rows",
        "--columns",
        "--value",
        "--curves",
        "--versus",
        "--log-x",
        "--order",
        "--traces",
    ):
        assert option in text
    assert "only seed is averaged" in text and "summary.csv" in text


def test_the_report_script_on_a_folder_without_runs_is_one_sentence(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="no runs under .*; give a sweep's folder"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a folder; give a sweep's folder"):
        main([str(tmp_path / "nowhere")])


def test_a_joined_column_takes_the_place_of_its_method_and_a_title_names_the_runs_values(tmp_path):
    """A key swept besides the experiment's columns joins them ("dni / cifar10"); such columns
    keep the experiment's order of methods, and `{key}` in the title lists the runs' values."""
    done = {"status": "completed", "test_error": 0.1}
    runs = [
        Run(tmp_path / f"{method}-{data}", {"model": {"depth": 3}}, done,
            {"method": method, "dataset": data}, [f"method={method}", f"dataset={data}"])
        for method in ("cdni", "bprop", "dni") for data in ("mnist", "cifar10")
    ]  # fmt: skip
    order = ["bprop", "dni", "cdni"]
    spec = ReportSpec(
        title="{dataset} by {method}; {missing}", rows="model.depth", columns="method", order=order
    )
    resolved = spec.resolved(runs)
    assert resolved.columns == "method,dataset"
    assert resolved.title == "cifar10, mnist by bprop, cdni, dni; {missing}"
    header = markdown_table(runs, spec).splitlines()[0]
    columns = [f"{method} / {data}" for method in order for data in ("cifar10", "mnist")]
    assert header == f"| model.depth | {' | '.join(columns)} |"
