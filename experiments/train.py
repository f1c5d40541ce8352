"""Train one configuration; the only Hydra entry point.

    python experiments/train.py                                  # backprop, FCN, MNIST
    python experiments/train.py experiment=mnist_fcn_cdni        # a paper setting
    python experiments/train.py -m method=bprop,dni,cdni model.depth=3,6

Each run writes into its Hydra output folder: `.hydra/`, TensorBoard events,
`metrics.json` and `checkpoints/`. Errors a user can cause end the run with one sentence
(and `status: failed` or `diverged` in metrics.json), never with a traceback.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so Hydra finds `experiments.*`

from dni.data import ClassificationData  # noqa: E402
from dni.errors import ConfigError, DNIError, Interrupted  # noqa: E402
from dni.methods import Backprop  # noqa: E402
from dni.tracking import read_metrics, write_json  # noqa: E402
from experiments.callbacks import RunFailed  # noqa: E402

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
    """Values the constructors would reject with an unhelpful message, checked up front."""
    for key in ("optim.lr", "method.synthesizer_optimizer.lr"):
        lr = OmegaConf.select(cfg, key)
        if lr is not None and not float(lr) > 0:
            raise ConfigError(f"{key}={lr} is not allowed; a learning rate must be > 0")
    if cfg.resume is not None and not Path(cfg.resume).exists():
        raise ConfigError(
            f"resume={cfg.resume} does not exist; point it at a run folder or a step_*.pt checkpoint"
        )


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The run's choices and settings, flattened, for TensorBoard's HPARAMS view."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not str(key).startswith("_") and key != "report":
                    walk(value, f"{prefix}{key}.")
        elif node is not None:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    for group in ("dataset", "model", "method", "synthesizer", "optim", "experiment"):
        if choices.get(group):
            flat[f"choice/{group}"] = choices[group]
    return flat


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Build everything the config names and train it; return the final metrics."""
    check_values(cfg)
    configure_torch(cfg.seed, cfg.threads, cfg.deterministic)
    pipeline = build(cfg.parallel) if cfg.get("parallel") else None  # claims this rank's GPU first
    device = pick_device(cfg.device)
    data = build(cfg.dataset).to(device)
    model = build(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes).to(device)
    if not getattr(model, "recurrent", False) and not isinstance(data, ClassificationData):
        raise ConfigError(
            f"model={model.name} learns from labelled examples (as bprop, dni and cdni need), but "
            f"dataset={data.name} is a sequence task; use model=lstm with method=bptt, rnn_dni or dni_aux"
        )
    twin = copy.deepcopy(model) if cfg.control else None
    optimizer = build(cfg.optim)
    guard = build(cfg.guard)
    method = build(cfg.method)(model=model, optimizer=optimizer, guard=guard)
    if twin is not None:
        from dni.methods.control import Controlled

        method = Controlled(method, Backprop(twin, optimizer, loss=method.loss.name))
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
    if pipeline is not None:  # one process per stage, launched by torchrun (dni.distributed)
        hparams = hyperparameters(cfg)
        return pipeline.fit(
            method, data, trainer, out_dir, scheduler=scheduler, hparams=hparams, resume=cfg.resume
        )
    return trainer.fit(
        method, data, out_dir, scheduler=scheduler, hparams=hyperparameters(cfg), resume=cfg.resume
    )


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


if __name__ == "__main__":
    quiet_other_ranks()
    main()
