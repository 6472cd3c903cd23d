"""Experiment tracking: metrics.jsonl, TensorBoard, W&B (offline) and the plot CLI, driven with
synthetic values (the trainer-level tests live in test_trainer.py)."""

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

from tests.dist_helper import run_script
from tinytron.training.config import ConfigError, LoggingConfig
from tinytron.training.metrics import METRICS_FILE, MetricsLogger, check_sink_packages


def _metrics(step: int, run: int = 0) -> dict:
    """Synthetic values of one step; `run` tells two attempts at the same step apart."""
    return {"step": step, "tokens": 1024 * (step + 1), "train/loss": 10.0 / (step + 1) + 0.001 * run,
            "val/loss": 9.0 / (step + 1) if step % 2 else None, "train/lr": 1e-3 * (step + 1),
            "train/grad_norm": 1.0 + 0.1 * step, "perf/step_time_s": 0.5, "perf/tokens_per_s": 2048.0,
            "perf/mfu": None, "perf/peak_memory_gib": None, "moe/aux_loss": 0.01,
            "moe/expert_load": [[3, 5], [4, 4]], "train/skipped_steps": 0}


def _logger(run_dir, resume_step=0, tensorboard=False, wandb_project="", wandb_id=None, is_main=True):
    return MetricsLogger(str(run_dir), {"exp": "test"}, is_main=is_main, resume_step=resume_step,
                         tensorboard=tensorboard, wandb_project=wandb_project, wandb_run_name="",
                         wandb_entity="", wandb_id=wandb_id)


def _jsonl(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def _tb_scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _next_second() -> None:
    """TensorBoard reads event files in name order, and a name is <unix second>.<host>.<pid>.<n>:
    two writers of one process within one second could sort out of order once n reaches 10
    (a real resume is another process, seconds later)."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_jsonl_and_tensorboard(tmp_path):
    logger = _logger(tmp_path, tensorboard=True)
    for step in range(5):
        logger.log(step, _metrics(step))
    logger.close()
    records = _jsonl(tmp_path)
    assert records == [dict(_metrics(s), step=s) for s in range(5)]  # None -> null -> None
    loss = _tb_scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == list(range(5))
    np.testing.assert_allclose([v for _, v in loss], [_metrics(s)["train/loss"] for s in range(5)], rtol=2**-24)
    # lists become one scalar per element, None (not measured) is not logged
    assert [v for _, v in _tb_scalars(tmp_path, "moe/expert_load/1/0")] == [4.0] * 5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "perf/mfu" not in acc.Tags()["scalars"]
    assert [s for s, _ in _tb_scalars(tmp_path, "val/loss")] == [1, 3]


def test_non_finite_is_null_and_other_ranks_write_nothing(tmp_path):
    _logger(tmp_path / "rank1", is_main=False).log(0, _metrics(0))
    assert not (tmp_path / "rank1").exists()
    logger = _logger(tmp_path)
    logger.log(0, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
    logger.close()
    assert _jsonl(tmp_path) == [{"step": 0, "train/loss": None, "train/grad_norm": None}]


def test_resume_logs_each_step_once(tmp_path):
    first = _logger(tmp_path, tensorboard=True)
    for step in range(6):
        first.log(step, _metrics(step, run=0))
    first.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut short by a crash mid-write
    _next_second()
    second = _logger(tmp_path, resume_step=3, tensorboard=True)  # checkpoint after 3 steps
    for step in range(3, 8):
        second.log(step, _metrics(step, run=1))
    second.close()
    expected = [_metrics(s, run=0 if s < 3 else 1)["train/loss"] for s in range(8)]
    records = _jsonl(tmp_path)
    assert [r["step"] for r in records] == list(range(8))
    assert [r["train/loss"] for r in records] == expected
    loss = _tb_scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == list(range(8))
    np.testing.assert_allclose([v for _, v in loss], expected, rtol=2**-24)
    # a fresh start (resume_step 0) in the same folder clears the earlier attempt
    _logger(tmp_path, resume_step=0).close()
    assert _jsonl(tmp_path) == []


def test_wandb_offline_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    first = _logger(tmp_path, wandb_project="tinytron-test")
    run_id = first.wandb_id
    assert run_id
    for step in range(4):
        first.log(step, _metrics(step))
    first.close()
    second = _logger(tmp_path, resume_step=2, wandb_project="tinytron-test", wandb_id=run_id)
    assert second.wandb_id == run_id
    for step in range(2, 5):
        second.log(step, _metrics(step, run=1))
    second.close()
    runs = sorted(os.listdir(tmp_path / "wandb"))
    offline = [r for r in runs if r.startswith("offline-run-") and r.endswith(run_id)]
    assert len(offline) == 2, runs  # both attempts wrote to the same run id, under run_dir
    assert [r["step"] for r in _jsonl(tmp_path)] == list(range(5))


@pytest.mark.parametrize("flag, module, field", [("--tensorboard", "tensorboard", {"tensorboard": True}),
                                                 ("--wandb_project", "wandb", {"wandb_project": "p"})])
def test_missing_package_is_one_line(monkeypatch, flag, module, field):
    check_sink_packages(LoggingConfig())  # nothing requested: nothing imported, no error
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    # torch.utils.tensorboard caches the import; drop it so the check imports tensorboard again
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError) as e:
        check_sink_packages(LoggingConfig(**field))
    message = str(e.value)
    assert "\n" not in message and flag in message and "pip install -e '.[track]'" in message


def _write_run(run_dir, n: int, scale: float) -> None:
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, METRICS_FILE), "w") as f:
        for s in range(n):
            m = dict(_metrics(s), step=s)
            m["train/loss"] *= scale
            f.write(json.dumps(m) + "\n")


def test_plot(tmp_path):
    import matplotlib.image

    from tinytron.commands.plot import DPI, FIGSIZE, plot_runs
    _write_run(tmp_path / "run_a", 20, 1.0)
    _write_run(tmp_path / "run_b", 12, 1.5)
    for x in ("step", "tokens"):
        out = tmp_path / f"curves_{x}.png"
        plot_runs([str(tmp_path / "run_a"), str(tmp_path / "run_b")], str(out), x=x)
        image = matplotlib.image.imread(out)
        assert image.shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI)
        assert image[..., :3].std() > 0  # something was drawn
    # the CLI: a folder without metrics.jsonl is one line on stderr and exit code 2
    (tmp_path / "empty").mkdir()
    result = run_script("-m", "tinytron.commands.plot", str(tmp_path / "run_a"), str(tmp_path / "empty"),
                        "--out", str(tmp_path / "bad.png"), cwd=os.getcwd())
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "metrics.jsonl" in result.stderr
    assert not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------- through the Trainer
def _trainer_run(log_dir, *flags):
    from tests.utils import tiny_config
    from tinytron.training import Trainer
    trainer = Trainer(tiny_config(log_dir, *flags))
    trainer.train()
    return trainer.run_dir


def test_trainer_tensorboard_matches_log_txt(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.utils import read_log
    run_dir = _trainer_run(tmp_path, "--tensorboard", "--no-do_save")
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    log = read_log(run_dir)
    assert sorted(tb) == sorted(log) == list(range(8))
    for step, loss in log.items():  # log.txt has 6 decimals; TB float32
        assert abs(tb[step] - loss) <= 5e-7 + 1e-6 * abs(loss)
    val = {e.step: e.value for e in acc.Scalars("val/loss")}
    assert sorted(val) == sorted(read_log(run_dir, "val")) == [3, 7]


def test_trainer_resume_metrics_each_step_once(tmp_path):
    run_dir = _trainer_run(tmp_path)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_00000008"))
    assert _trainer_run(tmp_path) == run_dir
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(8))


def test_trainer_missing_sink_package_is_one_line(tmp_path):
    from tests.utils import TINY_FLAGS
    code = ("import sys; sys.modules['wandb'] = None; sys.argv = ['x'] + sys.argv[1:]; "
            "from tinytron.training import run; run()")
    r = run_script("-c", code, *TINY_FLAGS, "--log_dir", str(tmp_path), "--wandb_project", "p", cwd=os.getcwd())
    assert r.returncode == 2
    assert r.stderr.strip() == "[tinytron] error: --wandb_project needs the wandb package: pip install -e '.[track]'"
