"""Values that used to leak a traceback or be accepted silently: each ends in one sentence
naming the config key, alone and inside a sweep, and a resume never mixes two configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dni.cli.callbacks import why_unwritable
from dni.cli.report import collect
from dni.cli.train import run
from dni.errors import DNIError
from dni.tracking import read_metrics
from tests.helpers import REPO, THREADS, compose_config, run_cli

# overrides -> what the sentence must say; every one once escaped as a traceback (or ran).
BAD_VALUES = {
    "learning rate not a number": (["optim.lr=abc"], "optim.lr=abc is not allowed"),
    "beta >= 1": (["optim.betas=[2.0,0.999]"], "optim.betas=[2.0,0.999] is not allowed"),
    "weight decay < 0": (["optim.weight_decay=-1"], "optim.weight_decay=-1 is not allowed"),
    "momentum < 0": (["optim=sgd", "optim.momentum=-1"], "optim.momentum=-1 is not allowed"),
    "synthesizer betas": (
        ["method=dni", "+method.synthesizer_optimizer.betas=[0.9]"],
        "method.synthesizer_optimizer.betas=[0.9] is not allowed",
    ),
    "threads < 1": (["threads=0"], "threads=0 is not allowed"),
    "seed not a number": (["seed=abc"], "seed=abc is not allowed"),
    "switch not a boolean": (["control=abc"], "control=abc is not allowed; give true or false"),
    "library switch not a boolean": (["model.bias=abc"], "model.bias=abc is not allowed; give true or false"),
    "nested switch not a boolean": (
        ["method=dni", "method.input_synthesizer.zero_init=abc"],
        "method.input_synthesizer.zero_init=abc is not allowed; give true or false",
    ),
    "setting of another method": (
        ["experiment=copy_lstm", "method=cdni"],
        "method.truncation is not a setting of the chosen method",
    ),
    "data set setting of the wrong type": (
        ["dataset.num_train=abc"],
        "the chosen dataset cannot be built from its settings",
    ),
    "milestones not steps": (["scheduler=multistep", "scheduler.milestones=abc"], "scheduler.milestones=abc"),
    "gamma <= 0": (["scheduler=multistep", "scheduler.gamma=0"], "scheduler.gamma=0 is not allowed"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_bad_value_is_one_sentence_naming_the_key(case, tmp_path):
    overrides, message = BAD_VALUES[case]
    fast = [] if any(o.startswith("experiment=") for o in overrides) else ["debug=fast"]
    cfg = compose_config(*fast, "device=cpu", "trainer.progress=false", *overrides)
    with pytest.raises(DNIError) as error:
        run(cfg, tmp_path)
    text = str(error.value)
    assert message in text and "\n" not in text and ". " not in text, text
    assert read_metrics(tmp_path) is None


def test_a_switch_found_in_two_places_is_named_as_the_user_set_it(tmp_path):
    """The synthesizer is also resolved under the method; the sentence names the key typed."""
    cfg = compose_config(
        "debug=fast", "device=cpu", "method=dni", "synthesizer=mlp", "synthesizer.batch_norm=0"
    )
    with pytest.raises(DNIError, match=r"^synthesizer\.batch_norm=0 is not allowed; give true or false$"):
        run(cfg, tmp_path)


def test_output_folder_under_proc_is_named():
    problem = why_unwritable(Path("/proc/dni-test/run"))
    assert problem is not None and problem.startswith("it cannot be created or written there")


def test_a_sweep_with_a_bad_value_fails_that_job_and_still_reports(tmp_path):
    result = run_cli(
        "-m",
        "debug=fast",
        "optim.lr=abc,1e-3",
        "trainer.progress=false",
        "report={rows:optim.lr,columns:method,curves:null}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    jobs = {str(job.lookup("optim.lr")): job for job in collect(tmp_path)}
    assert jobs["abc"].status == "failed" and "optim.lr=abc is not allowed" in jobs["abc"].metrics["error"]
    assert jobs["0.001"].status == "completed"
    report = (tmp_path / "report.md").read_text()
    assert "| abc | failed |" in report


SHORT = ["debug=fast", "device=cpu", "trainer.progress=false", "trainer.steps=10"]


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    run(compose_config(*SHORT), tmp_path)  # a checkpoint at step 10, trained with optim.lr=0.001
    longer = ["debug=fast", "trainer.steps=20", "optim.lr=0.01", f"hydra.run.dir={tmp_path}"]
    result = run_cli(*longer)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    checkpoint = tmp_path / "checkpoints" / "step_000000010.pt"
    assert f"checkpoint {checkpoint} was trained with other settings: optim.lr (0.001 there, 0.01 here);" in (
        result.stderr
    )
    assert "set resume_accepts_changes=true" in result.stderr

    accepted = run(compose_config(*SHORT[:-1], *longer[1:3], "resume_accepts_changes=true"), tmp_path)
    assert accepted["status"] == "completed" and accepted["steps"] == 20
    again = run(compose_config(*SHORT[:-1], "trainer.steps=30", "optim.lr=0.01"), tmp_path)
    assert again["steps"] == 30  # the accepted settings are now the checkpoint's


def test_a_run_saved_before_a_setting_existed_resumes_when_the_setting_keeps_its_old_meaning(tmp_path):
    """Checkpoints written before `method.target_lambda` and `method.batched` existed lack them:
    the first at 0 trains as those runs did, the second never changes a result."""
    run(compose_config(*SHORT, "method=dni", "method.batched=false"), tmp_path)
    record = tmp_path / "checkpoints" / "config.yaml"
    saved = OmegaConf.load(record)
    for key in ("target_lambda", "batched"):
        del saved.config.method[key]
    OmegaConf.save(saved, record)
    with pytest.raises(DNIError, match=r"method.target_lambda \(absent there, 0.5 here\)"):
        changed = compose_config(*SHORT[:-1], "trainer.steps=20", "method=dni", "method.target_lambda=0.5")
        run(changed, tmp_path)
    resumed = run(compose_config(*SHORT[:-1], "trainer.steps=20", "method=dni"), tmp_path)
    assert resumed["status"] == "completed" and resumed["steps"] == 20


def test_resume_with_another_optimizer_is_refused_before_it_fails(tmp_path):
    run(compose_config(*SHORT, "optim=sgd"), tmp_path)
    with pytest.raises(
        DNIError, match=r"optim._target_ \(torch.optim.SGD there, torch.optim.Adam here\), optim.betas"
    ):
        run(compose_config(*SHORT[:-1], "trainer.steps=20"), tmp_path)


def test_pipeline_ranks_given_different_settings_are_refused(tmp_path):
    """Every rank builds its own optimisers: one launched with another optim.lr must be named."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["debug=fast", "method=cdni", "parallel=pipeline", "device=cpu", "trainer.progress=false"]
    procs = []
    for rank, lr in ((0, "1e-3"), (1, "1e-2")):
        env = {
            **os.environ,
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": THREADS},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        }
        command = [sys.executable, str(REPO / "experiments" / "train.py"), *args, f"optim.lr={lr}"]
        command.append(f"hydra.run.dir={tmp_path / f'rank{rank}'}")
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1] and "Traceback" not in errors[0], errors[0]
    assert (
        "rank 1 differs from rank 0 in config method.synthesizer_optimizer.lr, config optim.lr" in errors[0]
    )
