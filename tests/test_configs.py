"""Every config group option and every experiment composes, instantiates, and runs briefly."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from dni.cli.train import build, build_model, run
from dni.data import ClassificationData, synthetic
from dni.errors import ConfigError, DataNotFoundError
from dni.methods import Method
from dni.tasks import copy as copy_task
from dni.tasks.windows import TokenWindows
from tests.helpers import CONF, compose_config, data_root

RECURRENT = ("dni.lstm.", "dni.methods.recurrent.")  # sequence cores and their rules


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def tiny(*overrides: str) -> list[str]:
    """Overrides that shrink any run to seconds on synthetic data."""
    return [
        *overrides,
        "dataset=synthetic",
        "dataset.num_train=256",
        "dataset.num_test=64",
        "trainer.steps=3",
        "trainer.epochs=null",
        "trainer.batch_size=32",
        "trainer.eval_every=3",
        "trainer.log_every=1",
        "trainer.progress=false",
        "device=cpu",
    ]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_vision_data_sets_compose_and_fail_clearly_offline(name, tmp_path):
    cfg = compose_config(f"dataset={name}", f"dataset.root={tmp_path}", "dataset.download=false")
    with pytest.raises(DataNotFoundError, match="DNI_DATA_ROOT"):
        build(cfg.dataset)


def test_synthetic_data_set_instantiates():
    data = instantiate(compose_config("dataset=synthetic").dataset)
    assert isinstance(data, ClassificationData) and data.input_shape == (1, 28, 28)


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("method", options("method"))
def test_every_model_and_method_instantiates(model, method):
    synthesizer = {"cnn": ["synthesizer=conv"], "fcn": [], "lstm": []}.get(model, ["synthesizer=auto"])
    depth = ["model.depth=2"] if "depth" in compose_config(f"model={model}").model else []
    cfg = compose_config(f"model={model}", f"method={method}", *depth, *synthesizer)
    data = synthetic(num_train=64, num_test=8, shape=(3, 32, 32) if model == "torchvision" else (1, 28, 28))
    if model == "transformer":  # token ids in, a next token at every position out
        ids = torch.randint(11, (64, 16))
        data = TokenWindows("tokens", ids, ids, ids, ids, num_classes=11)
    recurrent_model, recurrent_method = (cfg[g]._target_.startswith(RECURRENT) for g in ("model", "method"))
    if recurrent_model:  # an LSTM core refuses image data; with a sequence task it takes recurrent rules
        with pytest.raises(ConfigError, match="dataset=copy, repeat_copy or text"):
            instantiate(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes)
        if not recurrent_method:
            return
        data = copy_task()
    net = build_model(cfg.model, data.input_shape, data.num_classes)
    if recurrent_method and not recurrent_model:
        with pytest.raises(ConfigError, match="use model=lstm"):
            instantiate(cfg.method)(model=net, optimizer=instantiate(cfg.optim))
        return
    if model != "fcn" and method in ("backward_net", "fa", "dfa"):  # fully connected networks only
        with pytest.raises(ConfigError, match="use model=fcn"):
            instantiate(cfg.method)(model=net, optimizer=instantiate(cfg.optim))
        return
    if model != "fcn" and method.endswith("_unlocked"):  # the default input synthesizer is an MLP
        with pytest.raises(ConfigError, match="make method.input_synthesizer a dni.synthesizers.Conv"):
            instantiate(cfg.method)(model=net, optimizer=instantiate(cfg.optim))
        return
    instance = instantiate(cfg.method)(model=net, optimizer=instantiate(cfg.optim))
    assert isinstance(instance, Method) and instance.model is net


@pytest.mark.parametrize("synthesizer", options("synthesizer"))
def test_every_synthesizer_trains(synthesizer, tmp_path):
    model = ["model=cnn", "model.depth=2", "model.channels=8"] if synthesizer == "conv" else []
    cfg = compose_config(*tiny("method=cdni", f"synthesizer={synthesizer}", *model))
    assert run(cfg, tmp_path)["status"] == "completed"


@pytest.mark.parametrize("option", options("optim") + options("scheduler") + options("debug"))
def test_other_groups_compose_and_run(option, tmp_path):
    group = next(g for g in ("optim", "scheduler", "debug") if option in options(g))
    cfg = compose_config(*tiny(f"{group}={option}"))
    assert run(cfg, tmp_path)["status"] == "completed"


# The data sets (or tasks) an experiment is run on beside its own default, as its file and the
# README say: one experiment swept over `dataset` instead of a near-identical file per data set.
CLAIMS = {
    "table1_fcn": ["mnist", "cifar10"],
    "table1_cnn": ["mnist", "cifar10"],
    "copy_lstm": ["copy", "repeat_copy"],
}


def experiment_cases() -> list:
    """Every experiment, once per data set it claims (its default alone when it claims none)."""
    return [
        pytest.param(e, d, id=f"{e}-{d}" if d else e)
        for e in options("experiment")
        for d in CLAIMS.get(e, [None])
    ]


def test_every_claimed_data_set_is_an_option_and_every_claim_an_experiment():
    assert set(CLAIMS) <= set(options("experiment"))
    assert {d for ds in CLAIMS.values() for d in ds} <= set(options("dataset"))


@pytest.mark.parametrize(("experiment", "dataset"), [(e, d) for e, ds in CLAIMS.items() for d in ds])
def test_an_experiment_composes_for_each_data_set_it_claims_changing_only_the_data(experiment, dataset):
    """`experiment=X dataset=D` is X's setting on D's data: the data set's own config, every
    other key (model, method, budget, sweep, report) as X sets it, and a report titled by D."""
    cfg = compose_config(f"experiment={experiment}", f"dataset={dataset}")
    default = compose_config(f"experiment={experiment}")
    assert cfg.dataset == compose_config(f"dataset={dataset}").dataset
    with open_dict(cfg), open_dict(default):
        del cfg["dataset"], default["dataset"]
    assert cfg == default
    assert "{dataset}" in cfg.report.title  # filled from the runs' data set by the report


@pytest.mark.parametrize(("experiment", "dataset"), experiment_cases())
def test_every_experiment_runs_on_a_tiny_budget(experiment, dataset, tmp_path, monkeypatch):
    chosen = [f"experiment={experiment}"] + ([f"dataset={dataset}"] if dataset else [])
    cfg = compose_config(*chosen)
    if cfg.model._target_.startswith(RECURRENT):  # sequence tasks: a tiny core and evaluation instead
        monkeypatch.setenv("DNI_DATA_ROOT", str(data_root()))  # Tiny Shakespeare for dataset=text
        overrides = [o for o in tiny() if not o.startswith(("dataset", "trainer.batch_size"))]
        overrides += [*chosen, "model.hidden_size=8", "dataset.eval_size=16"]
        overrides += ["trainer.batch_size=4", "trainer.diagnostics_every=2"]
        result = run(compose_config(*overrides), tmp_path)
        assert result["status"] == "completed" and result["steps"] == 3
        if dataset:  # the task the run says it ran
            assert OmegaConf.load(tmp_path / "checkpoints" / "config.yaml").run.dataset == dataset
        return
    if cfg.dataset._target_.endswith("char_windows"):  # a Transformer: Tiny Shakespeare's windows, shrunk
        monkeypatch.setenv("DNI_DATA_ROOT", str(data_root()))
        overrides = [o for o in tiny() if not o.startswith("dataset")] + [f"experiment={experiment}"]
        overrides += ["dataset.num_train=64", "dataset.num_test=4", "dataset.length=16"]
        overrides += ["model.depth=2", "model.width=16", "model.heads=2", "trainer.diagnostics_every=2"]
        result = run(compose_config(*overrides), tmp_path)
        assert result["status"] == "completed" and result["steps"] == 3
        return
    # On synthetic data of the chosen data set's shape (CIFAR-10 is not offline).
    shape = {"cifar10": "[3,32,32]"}.get(cfg.dataset.get("name"), "[1,28,28]")
    overrides = tiny(f"experiment={experiment}", f"dataset.shape={shape}")
    if cfg.model._target_.endswith("CNN"):
        overrides.append("model.channels=8")
    result = run(compose_config(*overrides), tmp_path)
    assert result["status"] == "completed" and result["steps"] == 3


def test_paper_budget_sets_the_papers_steps_and_schedule():
    cfg = compose_config("experiment=mnist_fcn", "method=cdni", "budget=paper")
    assert cfg.trainer.steps == 500_000 and cfg.optim.lr == 3e-5 and cfg.trainer.batch_size == 256
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    assert sorted(scheduler.milestones) == [300_000, 400_000] and scheduler.gamma == 0.1


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
@pytest.mark.parametrize("method", ["bprop", "dni", "fa"])
def test_every_optimiser_of_a_method_follows_the_optimiser_implementation(implementation, method):
    """`optim.fused=true` (or `foreach`) reaches the head's, the blocks' and the synthesizers'
    optimisers alike, so a comparison between methods stays fair."""
    cfg = compose_config(f"method={method}", "model.depth=2", f"optim.{implementation}=true")
    net = build_model(cfg.model, (1, 28, 28), 10)
    built = instantiate(cfg.method)(model=net, optimizer=instantiate(cfg.optim))
    groups = [g for o in built.optimizers for g in o.param_groups]
    stepped = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in stepped for p in built.parts.parameters() if p.requires_grad)
    assert all(g[implementation] is True for g in groups)
