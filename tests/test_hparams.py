"""What a sweep shows in TensorBoard, read back through TensorBoard's own hparams backend:
its columns (the swept keys first, the same keys for every run), named runs, and log lines
that say which job wrote them."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

FAST = ["debug=fast", "device=cpu", "trainer.progress=false", "trainer.diagnostics_every=0"]


def _tensorboard(logdir):
    """The hparams plugin's view of `logdir`: its experiment and each run's hyperparameters,
    as the TensorBoard server computes them."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, metadata

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    )
    request = context.RequestContext()
    found = backend.hparams_metadata(request, "")
    experiment = backend.experiment_from_metadata(request, "", True, found, None)
    runs = {
        run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG]).hparams
        for run, tags in found.items()
        if metadata.SESSION_START_INFO_TAG in tags
    }
    last = backend.read_last_scalars(request, "", None)
    return experiment, runs, last


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """bprop and cdni (which has settings bprop lacks), at two learning rates."""
    folder = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", "method=bprop,cdni", "optim.lr=0.001,0.01", *FAST, f"hydra.sweep.dir={folder}")
    assert result.returncode == 0, result.stderr
    return folder, result


def test_the_swept_keys_are_the_first_columns_and_marked_as_differing(sweep):
    folder, _ = sweep
    experiment, runs, _ = _tensorboard(folder)
    columns = [info.name for info in experiment.hparam_infos]
    differing = [info.name for info in experiment.hparam_infos if info.differs]
    assert {"choice/method", "optim.lr"} <= set(differing)
    assert "trainer.batch_size" in columns and "trainer.batch_size" not in differing
    assert "choice/dataset" not in differing  # the same in every job
    # Every column the sweep declared is a key of every run, with one type per column.
    assert len(runs) == 4
    for run, values in runs.items():
        assert set(values) == set(columns), run
    lr = next(info for info in experiment.hparam_infos if info.name == "optim.lr")
    assert sorted(v.number_value for v in lr.domain_discrete.values) == [0.001, 0.01]


def test_a_setting_one_method_lacks_is_written_as_absent(sweep):
    folder, _ = sweep
    experiment, runs, _ = _tensorboard(folder)
    only_cdni = "method.synthesizer_optimizer.lr"
    assert only_cdni in [info.name for info in experiment.hparam_infos]
    found = {(run["choice/method"].string_value, run[only_cdni].string_value) for run in runs.values()}
    assert found == {("bprop", "n/a"), ("cdni", "0.001"), ("cdni", "0.01")}  # it follows optim.lr


def test_the_metric_columns_hold_each_run_s_results(sweep):
    folder, _ = sweep
    experiment, runs, last = _tensorboard(folder)
    tags = [info.name.tag for info in experiment.metric_infos]
    assert tags[:3] == ["result/test_error", "result/best_test_error", "result/test_loss"]
    assert {"result/steps", "result/wall_time_s", "result/status"} <= set(tags)
    for run in runs:
        metrics = json.loads((folder / run / "metrics.json").read_text())
        assert last[run]["result/test_error"].value == pytest.approx(metrics["test_error"])
        assert last[run]["result/steps"].value == metrics["steps"] == 20
        assert last[run]["result/status"].value == 0  # completed
        best = min(error for _, error in metrics["history"]["test/error"])
        assert last[run]["result/best_test_error"].value == pytest.approx(best)


def test_runs_are_named_after_what_distinguishes_them(sweep):
    folder, result = sweep
    names = sorted(path.name for path in folder.iterdir() if path.is_dir())
    assert names == [
        "0_method=bprop,optim.lr=0.001",
        "1_method=bprop,optim.lr=0.01",
        "2_method=cdni,optim.lr=0.001",
        "3_method=cdni,optim.lr=0.01",
    ]
    _, runs, _ = _tensorboard(folder)
    assert sorted(runs) == names  # TensorBoard's run list
    # Each job's log lines carry its name, on the console and in its log file.
    job_lines = [line for line in result.stdout.splitlines() if "[dni.training]" in line]
    assert job_lines and all(line.split("]")[1].lstrip("[") in names for line in job_lines)
    assert "[3_method=cdni,optim.lr=0.01][dni" in (folder / names[3] / "train.log").read_text()


def test_a_single_run_declares_its_own_columns(tmp_path):
    result = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    experiment, runs, _ = _tensorboard(tmp_path)
    assert list(runs) == ["run"]
    assert {info.name for info in experiment.hparam_infos} == set(runs["run"])
    assert "result/test_error" in [info.name.tag for info in experiment.metric_infos]
    assert "[run]" not in result.stdout  # no job label outside a sweep
