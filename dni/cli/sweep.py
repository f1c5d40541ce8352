"""What a sweep varies, worked out once when it starts, so that every job can say it.

At the start of a multirun (`dni.cli.callbacks.SweepSetup`) the sweep's job list is
expanded from Hydra's overrides (the experiment's `hydra.sweeper.params` and the command
line), and written to `sweep.json` in the sweep folder:

- `swept`: the keys whose value differs between jobs, in the order they were given;
- `hparams`: the columns of TensorBoard's HPARAMS view, the union of every job's keys (each
  job's config is composed here), swept keys first; the sweep folder's own events declare
  them, and every job writes exactly these keys (`sweep_hparams`);
- `jobs`: each job's overrides and its name, e.g. `method=cdni,model.depth=6`.

A job's folder is named after what distinguishes it (`3_method=cdni,model.depth=6`, the
resolver `dni.job_folder` in `hydra.sweep.subdir`), so TensorBoard's run list reads the
same, and its log lines carry that name (`dni.log_label` in the logging format), so the
lines of parallel jobs can be told apart.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.plugins.hparams import api_pb2

from dni.tracking import conform, hparam_infos, write_experiment

log = logging.getLogger("dni")

PLAN_FILE = "sweep.json"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
MAX_NAME = 120  # characters of a job's name kept in its folder name


def hyperparameters(cfg: DictConfig | dict, choices: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's choices and settings, flattened, for TensorBoard's HPARAMS view: every
    setting (`model.depth`), and each config group's choice (`choice/method`)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not str(key).startswith("_") and key not in ("report", "hydra"):
                    walk(value, f"{prefix}{key}.")
        elif node is not None:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg, "")
    for group, choice in (choices or {}).items():
        if choice is not None and not group.startswith("hydra"):
            flat[f"choice/{group}"] = choice
    return flat


def job_overrides(sweeper_params: dict[str, Any] | None, task: list[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them (config params first,
    then the command line, the cartesian product of the swept ones)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    given = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task)
    parsed = OverridesParser.create().parse_overrides(given)
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return jobs


def _pairs(overrides: list[str]) -> list[tuple[str, str]]:
    """(key, value as typed) of each override; `+`/`~` prefixes dropped from the key."""
    return [
        (o.key_or_group, o.get_value_element_as_str() if o.value() is not None else "null")
        for o in OverridesParser.create().parse_overrides(list(overrides))
    ]


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys whose value differs between jobs, in the order they were given."""
    seen: dict[str, set[str]] = {}
    for job in jobs:
        for key, value in _pairs(job):
            seen.setdefault(key, set()).add(value)
    return [key for key, values in seen.items() if len(values) > 1]


def job_name(overrides: list[str], swept: list[str]) -> str:
    """`method=cdni,model.depth=6`: the job's values of the swept keys."""
    pairs = dict(_pairs(overrides))
    return ",".join(f"{key}={pairs[key]}" for key in swept if key in pairs)


def plan(config: DictConfig, config_name: str | None) -> dict[str, Any] | None:
    """The sweep's plan (see the module's docstring), or None for a sweeper other than
    Hydra's basic one, whose jobs are not known in advance."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    task = OmegaConf.to_container(config.hydra.overrides.task)
    params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") else {}
    jobs = job_overrides(params, task)
    swept = swept_keys(jobs)
    runs = [values for values in (_composed_hparams(config_name, job) for job in jobs) if values is not None]
    columns = {f"choice/{key}" if any(f"choice/{key}" in r for r in runs) else key for key in swept}
    first = [c for key in swept for c in (f"choice/{key}", key) if c in columns]
    infos = hparam_infos(runs, swept=first)
    return {
        "swept": swept,
        "hparams": [json_format.MessageToDict(info) for info in infos],
        "jobs": [{"overrides": job, "name": job_name(job, swept)} for job in jobs],
    }


def _composed_hparams(config_name: str | None, overrides: list[str]) -> dict[str, Any] | None:
    """One job's hyperparameters, from its config composed here (None when it does not compose:
    the job itself will say why)."""
    from hydra import compose

    try:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]  # its folder names resolve only inside a job
        return hyperparameters(cfg, choices)
    except Exception as error:  # noqa: BLE001 - any failure here is the job's to report
        log.debug("could not compose the job %s: %s", overrides, error)
        return None


def write_plan(sweep_dir: Path, sweep_plan: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PLAN_FILE).write_text(json.dumps(sweep_plan, indent=2) + "\n")
    write_experiment(sweep_dir, _infos(sweep_plan))


def read_plan(sweep_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(sweep_dir) / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _infos(sweep_plan: dict[str, Any]) -> list[api_pb2.HParamInfo]:
    return [json_format.ParseDict(info, api_pb2.HParamInfo()) for info in sweep_plan["hparams"]]


def sweep_hparams(values: dict[str, Any], sweep_dir: str | Path) -> dict[str, Any] | None:
    """A job's hyperparameters with exactly its sweep's keys and types, or None when the
    sweep has no plan."""
    sweep_plan = read_plan(sweep_dir)
    return conform(values, _infos(sweep_plan)) if sweep_plan else None


def job_folder(num: Any, _root_: DictConfig) -> str:
    """`3_method=cdni,model.depth=6` for job 3 of a sweep over method and model.depth; the
    number alone when the sweep has no plan or varies nothing."""
    try:
        sweep_plan = read_plan(str(_root_.hydra.sweep.dir))
        overrides = list(_root_.hydra.overrides.task)
    except Exception:  # noqa: BLE001 - outside a sweep: the number
        sweep_plan = None
    name = job_name(overrides, sweep_plan["swept"]) if sweep_plan else ""
    name = re.sub(r"[/\\\s]+", "_", name)[:MAX_NAME]
    return f"{num}_{name}" if name else str(num)


def log_label(_root_: DictConfig) -> str:
    """`[3_method=cdni,model.depth=6]` in a sweep job's log lines; nothing in a single run."""
    try:
        if str(_root_.hydra.mode) != "RunMode.MULTIRUN" and str(_root_.hydra.mode) != "MULTIRUN":
            return ""
        name = Path(str(_root_.hydra.runtime.output_dir)).name
    except Exception:  # noqa: BLE001 - not inside a Hydra job
        return ""
    return f"[{name.replace('%', '%%')}]"


OmegaConf.register_new_resolver("dni.job_folder", job_folder, replace=True)
OmegaConf.register_new_resolver("dni.log_label", log_label, replace=True)
