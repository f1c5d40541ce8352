"""Train one configuration; the only Hydra entry point.

    dni-train                                  # backprop, FCN, MNIST
    dni-train experiment=mnist_fcn method=cdni # a paper setting
    dni-train -m method=bprop,dni,cdni model.depth=3,6

(`python -m dni` and `python experiments/train.py` are the same command.)

Each run writes into its Hydra output folder: `.hydra/`, TensorBoard events,
`metrics.json` and `checkpoints/`. Errors a user can cause end the run with one sentence
(and `status: failed` or `diverged` in metrics.json), never with a traceback.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dni import checkpoint
from dni.cli.callbacks import RunFailed
from dni.cli.sweep import hyperparameters, sweep_hparams
from dni.data import ClassificationData
from dni.errors import ConfigError, DNIError, Interrupted, RunFolderError
from dni.methods import Backprop
from dni.splitting import split
from dni.tracking import read_metrics, write_json

log = logging.getLogger("dni")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate`, letting our own errors through instead of Hydra's wrapper around them."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, DNIError):
            raise error.__cause__ from None
        raise


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} but CUDA is not available on this machine; use device=cpu or device=auto"
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device={name!r} is unknown; choose cpu, cuda or auto")
    return torch.device(name)


def configure_torch(seed: int, threads: int | None, deterministic: bool) -> None:
    if threads is not None:
        torch.set_num_threads(int(threads))
    if deterministic:
        from torch.backends import cudnn  # imported here: joblib cannot pickle it as a global

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_values(cfg: DictConfig) -> None:
    """Values the constructors would reject with a bare traceback, or accept and then ignore
    (a seed of "abc", `milestones=abc`), checked up front so the error names the config key."""
    for key in ("seed", "trainer.seed", "dataset.seed"):
        seed = OmegaConf.select(cfg, key)
        if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
            raise ConfigError(f"{key}={_show(seed)} is not allowed; give an integer in [0, 2**32)")
    for key in ("control", "deterministic", "resume_accepts_changes"):
        if not isinstance(cfg.get(key, False), bool):  # a string such as "abc" would count as true
            raise ConfigError(f"{key}={_show(cfg.get(key))} is not allowed; give true or false")
    check_switches(cfg)
    threads = cfg.threads
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise ConfigError(
            f"threads={_show(threads)} is not allowed; give an integer >= 1, or null for torch's default"
        )
    for key in ("optim", "method.synthesizer_optimizer"):
        if OmegaConf.select(cfg, key) is not None:
            check_optimizer(cfg, key)
    if cfg.get("scheduler"):
        check_scheduler(cfg)
    if cfg.resume is not None and not Path(cfg.resume).exists():
        raise ConfigError(
            f"resume={cfg.resume} does not exist; point it at a run folder or a step_*.pt checkpoint"
        )


def check_switches(cfg: DictConfig) -> None:
    """Every switch of a library object must be true or false: `model.bias=abc` would reach
    the constructor as a string and count as true. A switch is an argument whose default is
    true or false in the signature of its node's `_target_`, so each one is covered without a
    list, including settings an experiment adds. A value that appears in several places (the
    synthesizer, also under the method) is named where it is shallowest, as a user sets it."""
    wrong = sorted(_wrong_switches(_resolved(cfg)), key=lambda found: found[0].count("."))
    if wrong:
        key, value = wrong[0]
        raise ConfigError(f"{key}={_show(value)} is not allowed; give true or false")


def _wrong_switches(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _wrong_switches(item, f"{prefix}{index}.")
    elif isinstance(node, dict):
        switches = _switches(node["_target_"]) if isinstance(node.get("_target_"), str) else set()
        for key, value in node.items():
            if key in switches and not isinstance(value, bool):
                yield f"{prefix}{key}", value
            yield from _wrong_switches(value, f"{prefix}{key}.")


def _switches(target: str) -> set[str]:
    """The arguments of `target` whose default is a bool; none when it cannot be found (the
    build names that)."""
    module, _, name = target.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):  # reported when it is built
        return set()
    return {p.name for p in parameters if isinstance(p.default, bool)}


# Optimiser settings checked by name: (what it is, lowest allowed value, whether the lowest is allowed).
OPTIMIZER_RANGES = {
    "lr": ("a learning rate", 0.0, False),
    "weight_decay": ("a weight decay", 0.0, True),
    "momentum": ("a momentum", 0.0, True),
    "dampening": ("a dampening", 0.0, True),
    "eps": ("an epsilon", 0.0, True),
}


def check_optimizer(cfg: DictConfig, key: str) -> None:
    """The optimiser at `key`: its usual settings by name, then a trial build on one
    parameter, so that anything else torch rejects is also reported under `key`."""
    node = OmegaConf.select(cfg, key)
    for name, (what, low, inclusive) in OPTIMIZER_RANGES.items():
        value = node.get(name)
        if value is None:
            continue
        if not (_is_number(value) and (value >= low if inclusive else value > low)):
            bound = ">=" if inclusive else ">"
            raise ConfigError(
                f"{key}.{name}={_show(value)} is not allowed; {what} must be a number {bound} {low:g}"
            )
    betas = node.get("betas")
    if betas is not None and not (
        OmegaConf.is_list(betas) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(
            f"{key}.betas={_show(betas)} is not allowed; give two numbers in [0, 1) such as [0.9,0.999]"
        )
    with naming(key):
        build(node)([torch.nn.Parameter(torch.zeros(1))])


def check_scheduler(cfg: DictConfig) -> None:
    """A learning-rate schedule whose steps are not integers never fires (MultiStepLR turns
    `milestones=abc` into the steps "a", "b" and "c"), so its values are checked by name."""
    node = cfg.scheduler
    milestones = node.get("milestones")
    if milestones is not None and not (
        OmegaConf.is_list(milestones) and all(_is_int(m) and m > 0 for m in milestones)
    ):
        raise ConfigError(
            f"scheduler.milestones={_show(milestones)} is not allowed; give a list of steps > 0 "
            "such as [300000,400000]"
        )
    gamma = node.get("gamma")
    if gamma is not None and not (_is_number(gamma) and gamma > 0):
        raise ConfigError(f"scheduler.gamma={_show(gamma)} is not allowed; give a factor > 0 such as 0.1")
    with naming("scheduler"):
        build(node)(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if value is None:
        return "null"
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return str(value).replace(" ", "") if isinstance(value, (list, dict)) else str(value)


@contextmanager
def naming(key: str) -> Iterator[None]:
    """Errors a constructor raises about its arguments become one sentence naming `key`:
    the library names the argument, the runner adds the config key (and its choice)."""
    try:
        yield
    except DNIError:
        raise
    except (TypeError, ValueError, InstantiationException) as error:
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        if isinstance(cause, DNIError):
            raise cause from None
        raise ConfigError(describe(key, cause)) from None


def describe(key: str, error: BaseException) -> str:
    """One sentence saying which part of the config `error` came from."""
    choice = _choice(key)
    chosen = f"{key}={choice}" if choice else f"the chosen {key}"
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if unexpected:
        setting = unexpected.group(1)
        return (
            f"{key}.{setting} is not a setting of {chosen} (an experiment or an override set it "
            f"for another {key}); remove it, or choose a {key} that takes it"
        )
    return f"{chosen} cannot be built from its settings ({_one_line(error)}); fix the {key}.* value it names"


def _choice(key: str) -> str | None:
    """The option picked for a config group (`adam` for `optim`), when Hydra ran the job."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return choices.get(key)


def _one_line(error: BaseException) -> str:
    """The first line of an error's message, without the sentence breaks of a longer text."""
    lines = str(error).strip().splitlines()
    text = lines[0].rstrip(".:") if lines else type(error).__name__
    return re.sub(r"\.\s+", "; ", text)


def build_model(node: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """The model a `model` config names: one of ours, built for the data's shapes; or, with
    `split`, any module by its `_target_`, cut after the submodules `split` names
    (`dni.splitting.split`; `input_dtype` and `classes_last` go there too)."""
    if "split" not in node:
        return build(node)(input_shape=input_shape, num_classes=num_classes)
    settings = OmegaConf.to_container(node, resolve=True)
    cuts = settings.pop("split")
    options = {key: settings.pop(key) for key in ("input_dtype", "classes_last") if key in settings}
    factory = build(OmegaConf.create({**settings, "_partial_": True}))
    return split(factory, at=cuts, input_shape=input_shape, num_classes=num_classes, **options)


def run_hparams(cfg: DictConfig) -> tuple[dict[str, Any], bool]:
    """The run's hyperparameters for TensorBoard's HPARAMS view, and whether the run declares
    the view's columns itself: a job of a planned sweep writes its sweep's keys instead,
    declared once in the sweep's folder (`dni.cli.sweep`)."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    values = hyperparameters(cfg, OmegaConf.to_container(hydra_cfg.runtime.choices) if hydra_cfg else None)
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        conformed = sweep_hparams(values, hydra_cfg.sweep.dir)
        if conformed is not None:
            return conformed, False
    return values, True


# The config groups whose keys the library's constructors take as arguments, in the order a
# key found in several is attributed.
ARGUMENT_GROUPS = ("method", "trainer", "model", "dataset", "parallel", "guard", "synthesizer")


def config_terms(message: str, cfg: DictConfig) -> str:
    """The library names its arguments (`p_update=2 is not allowed`), as a plain loop passes
    them; a user of the runner sets config keys, so say those (`method.p_update=2 ...`)."""

    def key(match: re.Match) -> str:
        name = match.group(1)
        if name in cfg:  # a top-level choice or setting (`synthesizer=conv`, `seed=1`) as it is
            return match.group(0)
        for group in ARGUMENT_GROUPS:
            node = cfg.get(group)
            if isinstance(node, DictConfig) and name in node:
                return f"{group}.{name}{match.group(2)}"
        return match.group(0)

    return re.sub(r"(?<![\w.-])([a-z_][a-z0-9_]*)(=)", key, message)


@contextmanager
def in_config_terms(cfg: DictConfig) -> Iterator[None]:
    """Errors of ours on their way out of the runner name config keys (`config_terms`)."""
    try:
        yield
    except DNIError as error:
        if len(error.args) == 1 and isinstance(error.args[0], str):
            error.args = (config_terms(error.args[0], cfg),)
        raise


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Build everything the config names and train it; return the final metrics."""
    with in_config_terms(cfg):
        return _run(cfg, out_dir)


def _run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    check_values(cfg)
    configure_torch(cfg.seed, cfg.threads, cfg.deterministic)
    with naming("parallel"):
        pipeline = build(cfg.parallel) if cfg.get("parallel") else None  # claims this rank's GPU first
    device = pick_device(cfg.device)
    with naming("dataset"):
        data = build(cfg.dataset).to(device)
    with naming("model"):
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    if not getattr(model, "recurrent", False) and not isinstance(data, ClassificationData):
        raise ConfigError(
            f"model={model.name} learns from labelled examples (as bprop, dni and cdni need), but "
            f"dataset={data.name} is a sequence task; use model=lstm with method=bptt, rnn_dni or dni_aux"
        )
    twin = copy.deepcopy(model) if cfg.control else None
    optimizer = build(cfg.optim)
    with naming("guard"):
        guard = build(cfg.guard)
    with naming("method"):
        method = build(cfg.method)(model=model, optimizer=optimizer, guard=guard)
    if twin is not None:
        from dni.methods.control import Controlled

        method = Controlled(method, Backprop(twin, optimizer, loss=method.loss.name))
    with naming("trainer"):
        trainer = build(cfg.trainer)
    scheduler = build(cfg.scheduler) if cfg.get("scheduler") else None
    log.info(
        "%s on %s (%s), %d steps, writing to %s",
        method.name,
        data.name,
        model.name,
        trainer.total_steps(data.num_train),
        out_dir,
    )
    names = {"method": method.name, "model": model.name, "dataset": data.name}
    check_resume(cfg, out_dir, names)
    record_config(cfg, out_dir, names)
    hparams, own_columns = run_hparams(cfg)
    if pipeline is not None:  # one process per stage, launched by torchrun (dni.distributed)
        return pipeline.fit(
            method, data, trainer, out_dir, scheduler=scheduler, hparams=hparams, resume=cfg.resume
        )
    return trainer.fit(
        method,
        data,
        out_dir,
        scheduler=scheduler,
        hparams=hparams,
        hparams_columns=own_columns,
        resume=cfg.resume,
    )


# The config the checkpoints beside it were trained with. Hydra rewrites `.hydra/config.yaml`
# at every start, so a resumed run would find its own config there, not the checkpoint's.
TRAINED_CONFIG = "config.yaml"

# Keys a resumed run may change: its budget (to train longer), how often it logs, evaluates and
# checkpoints, where it runs and where its data lies. Any other change alters what is trained.
CHANGEABLE_ON_RESUME = (
    "trainer.steps",
    "trainer.epochs",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.diagnostics_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.progress",
    "trainer.progress_every",
    "device",
    "threads",
    "deterministic",
    "resume",
    "resume_accepts_changes",
    "report",
    "dataset.root",
    "dataset.download",
    "method.batched",  # the batched step is bit-identical to the per-interface one
    "parallel.timeout",
    "parallel.backend",
)
# Settings added since a checkpoint may have been written, with the value that trains as it did.
ADDED_SINCE = {"method.target_lambda": 0.0, "method.synthesizer_ema": 0.0, "method.top_interface": True}


def check_resume(cfg: DictConfig, out_dir: Path, names: dict[str, str]) -> None:
    """Refuse to resume a checkpoint trained with other settings (a learning rate, batch size,
    seed or optimiser), which would otherwise go on silently with a mix of the two, unless
    `resume_accepts_changes=true`. A checkpoint of another method, model or data set is left to
    the checkpoint's own signature check, which names those."""
    source = _resume_source(cfg, out_dir)
    if source is None:
        return
    record = source.parent / TRAINED_CONFIG
    if not record.is_file():
        log.warning("%s does not record the config it was trained with; resuming unchecked", source.parent)
        return
    saved = OmegaConf.to_container(OmegaConf.load(record), resolve=True)
    if saved.get("run") != names:
        return
    there, here = _flatten(saved.get("config") or {}), _flatten(_resolved(cfg))
    changed = sorted(
        key
        for key in there.keys() | here.keys()
        if there.get(key, ADDED_SINCE.get(key)) != here.get(key) and not _changeable(key)
    )
    if not changed:
        return
    shown = ", ".join(
        f"{k} ({_show(there.get(k, 'absent'))} there, {_show(here.get(k, 'absent'))} here)"
        for k in changed[:5]
    )
    more = f", and {', '.join(changed[5:])}" if len(changed) > 5 else ""
    if cfg.get("resume_accepts_changes"):
        log.warning("resuming %s with changed settings: %s%s", source, shown, more)
        return
    raise ConfigError(
        f"checkpoint {source} was trained with other settings: {shown}{more}; resume with the same "
        "settings, start a new run folder (hydra.run.dir=...), or set resume_accepts_changes=true "
        "to continue with the new ones"
    )


def _changeable(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in CHANGEABLE_ON_RESUME)


def record_config(cfg: DictConfig, out_dir: Path, names: dict[str, str]) -> None:
    """Write the resolved config beside the checkpoints this run is about to write."""
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 writes the run folder
        return
    folder = out_dir / checkpoint.FOLDER
    record = OmegaConf.create({"run": names, "config": _resolved(cfg)})
    temporary = folder / f"{TRAINED_CONFIG}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(record, temporary)
        os.replace(temporary, folder / TRAINED_CONFIG)
    except OSError as error:  # a full disk at start-up: one sentence, as for a checkpoint
        temporary.unlink(missing_ok=True)
        raise RunFolderError(
            f"cannot write {folder / TRAINED_CONFIG}: {checkpoint.write_error_reason(error)}; free space "
            f"in {folder} and run the same command again, or write the run into another folder"
        ) from None


def _resume_source(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The checkpoint the trainer will resume from (as `Trainer.fit` picks it), or None."""
    if cfg.resume is None:
        return checkpoint.latest(out_dir)
    path = Path(cfg.resume)
    return checkpoint.latest(path) if path.is_dir() else path


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"optim.lr": 0.001, ...}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run(cfg, out_dir)["test_error"]
    except Interrupted as error:  # checkpoint and status are saved: say how to go on
        log.warning("%s", error)
        sys.exit(error.exit_code)
    except DNIError as error:
        if error.record:  # not when already recorded (a divergence) or not ours (a locked folder)
            record_failure(out_dir, str(error))
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", error)  # this job fails, the others go on; the sweep exits non-zero
            return None
        raise RunFailed(str(error)) from None
    except Exception as error:  # a bug: keep the traceback, but never leave "running" behind
        record_failure(out_dir, f"{type(error).__name__}: {error}")
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # in the job's log; the sweep goes on to its report
            log.exception("%s: %s", type(error).__name__, error)
            return None
        raise


def record_failure(out_dir: Path, message: str) -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 writes the run folder
        return
    previous = read_metrics(out_dir) or {}
    try:
        write_json(out_dir / "metrics.json", {**previous, "status": "failed", "error": message})
    except OSError as error:  # a full disk: the error itself still reaches the user
        log.warning("could not record the failure in %s (%s)", out_dir, error.strerror or error)


def quiet_other_ranks() -> None:
    """Under torchrun every rank runs this script, but only rank 0 writes the run folder: the
    others keep Hydra from saving `.hydra/` and a log file there, and log to the console."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def cli() -> None:
    """The `dni-train` command (and `python -m dni`)."""
    quiet_other_ranks()
    main()


if __name__ == "__main__":
    cli()
