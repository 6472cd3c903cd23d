"""Checkpoint and resume guarantees, driven through the real Trainer and entry script (gloo, CPU,
fp32, tiny models): exact resume, resume on another layout, atomic saves, non-finite steps, and
bad input (preemption: tests/test_preemption.py).

Tolerances: a resume on the layout that wrote the checkpoint replays the same fp32 operations in
the same order, so its losses are compared bitwise (as printed in log.txt, 6 decimals) and its
final weights with torch.equal. A resume on another layout only changes summation orders
(gradient reductions, attention over gathered heads, expert regrouping), which stays below 1e-6
relative over the parity tests' 10 AdamW steps; 1e-5 relative leaves a margin.
"""

import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed, run_script
from tests.utils import TINY_FLAGS, read_log, tiny_config
from tinytron.distributed.zero1.optimizer_state import read_state_dict
from tinytron.training import Trainer
from tinytron.training.checkpoint import COMPLETE, find_latest, list_complete, read_model_state, step_dir
from tinytron.training.metrics import METRICS_FILE, read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = ["--use_moe", "--num_experts", "4", "--num_experts_per_tok", "2", "--moe_intermediate_size", "32"]
VARIANTS = {"dense": [], "moe": MOE}
# Dropout makes the resumed losses depend on the restored RNG states (same layout only: dropout
# masks depend on the layout).
SAME_LAYOUT_VARIANTS = {**VARIANTS, "dropout": ["--dropout", "0.1"],
                        # MoE (expert chunks) with --async_save: its checkpoints are the moe run's
                        "async": [*MOE, "--async_save"]}
# Layouts that resume the world-2 / sep-2 checkpoint of VARIANTS: (world size, sep size).
LAYOUTS = {"w1": (1, 1), "w4sep1": (4, 1), "w4sep2": (4, 2)}


def resume_and_train(log_dir, *flags, cls=Trainer):
    """Build a trainer of the tiny config (it resumes its run's newest complete checkpoint, if
    any) and train to the end; -> (run dir, the step it started at)."""
    trainer = cls(tiny_config(log_dir, *flags))
    first = trainer.step
    trainer.train()
    return trainer.run_dir, first


def ckpt_path(run_dir: str, step: int) -> str:
    return step_dir(os.path.join(run_dir, "checkpoints"), step)


def complete_steps(run_dir: str) -> list[int]:
    return [int(os.path.basename(d)[5:]) for d in list_complete(os.path.join(run_dir, "checkpoints"))]


def read_state(path: str) -> dict:
    """<checkpoint>/model or <checkpoint>/optimizer, assembled into one full state dict."""
    return read_model_state(os.path.dirname(path)) if os.path.basename(path) == "model" else read_state_dict(path)


def assert_same_tensors(file_a: str, file_b: str, part: str | None = None) -> None:
    """Two saved (nested) dicts (or their entry `part`; see read_state) hold bitwise-equal
    tensors and equal other values."""
    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        if isinstance(obj, (list, tuple)):
            return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}.").items()}
        return {prefix: obj}
    a, b = (read_state(f) for f in (file_a, file_b))
    a, b = (flat(x if part is None else x[part]) for x in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        assert same, f"{key} differs between {file_a} and {file_b}"


def snapshot(path: str) -> dict:
    """{file: (mtime_ns, bytes)} of every file under path (or of the file path itself)."""
    files = [path] if os.path.isfile(path) else \
        [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            out[f] = (os.stat(f).st_mtime_ns, fh.read())
    return out


# ---------------------------------------------------------------------- exact resume, any layout
def _write_and_resume_at_world_2(base, variants, layouts):
    """World 2, sep 2, ZeRO-1 (sharded over the 2 ranks). Per variant: train 8 steps saving at 4
    and 8 into <base>/<name>; keep a copy of that uninterrupted run; delete step 8 (as if the job
    died after step 6) and, for VARIANTS, copy the run once per other layout; run the same
    command again.
    -> {name: step the re-run started at}."""
    starts = {}
    for name, flags in variants.items():
        flags = [*flags, "--sep_size", "2"]
        run_dir, _ = resume_and_train(f"{base}/{name}", *flags)
        if dist.get_rank() == 0:
            run_name = os.path.basename(run_dir)
            shutil.copytree(run_dir, f"{base}/{name}-uninterrupted/{run_name}")
            shutil.rmtree(ckpt_path(run_dir, 8))
            for layout in layouts if name in VARIANTS else ():
                shutil.copytree(run_dir, f"{base}/{name}-{layout}/{run_name}")
        dist.barrier()
        _, starts[name] = resume_and_train(f"{base}/{name}", *flags)
    return starts


def _resume_on_layouts(jobs):
    """Resume each (log dir, flags) job in this world; -> the steps they started at."""
    return [resume_and_train(log_dir, *flags)[1] for log_dir, flags in jobs]


@pytest.fixture(scope="module")
def world2_runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("world2"))
    starts = run_distributed(_write_and_resume_at_world_2, 2, base, SAME_LAYOUT_VARIANTS, list(LAYOUTS))[0]
    return base, starts


@pytest.mark.parametrize("variant", ["dense", "moe", "dropout", "async"])
def test_exact_resume_same_layout(world2_runs, variant):
    """World 2, sep 2, ZeRO-1, dense, MoE and dense with dropout: the re-run resumes at step 4,
    rewinds log.txt, logs every step once, and reproduces the uninterrupted losses (train and
    val) and final weights and optimizer state bitwise."""
    base, starts = world2_runs
    assert starts[variant] == 4
    flags = SAME_LAYOUT_VARIANTS[variant]
    run_dir = tiny_config(f"{base}/{variant}", *flags).run_dir
    ref_dir = tiny_config(f"{base}/{variant}-uninterrupted", *flags).run_dir
    with open(os.path.join(run_dir, "log.txt")) as f:
        steps = [(int(line.split()[0]), line.split()[1]) for line in f]
    assert steps == [(s, "train") for s in range(4)] + [(3, "val")] + \
        [(s, "train") for s in range(4, 8)] + [(7, "val")]
    for kind in ("train", "val"):
        assert read_log(run_dir, kind) == read_log(ref_dir, kind)
    assert complete_steps(run_dir) == [4, 8]
    for f in ("model", "optimizer"):
        assert_same_tensors(os.path.join(ckpt_path(run_dir, 8), f), os.path.join(ckpt_path(ref_dir, 8), f))


def test_async_save_writes_what_a_synchronous_save_writes(world2_runs):
    """--async_save (world 2, sep 2, MoE: ZeRO-1 and expert chunks staged): checkpoints 4 (written
    while steps 4.. ran) and 8 (after resuming 4) hold bitwise the tensors of the synchronous run's,
    and the losses are the same: resume, rewinds, other layouts and export read them alike."""
    base, _ = world2_runs
    sync_dir = tiny_config(f"{base}/moe-uninterrupted", *MOE).run_dir
    for name in ("async-uninterrupted", "async"):
        run_dir = tiny_config(f"{base}/{name}", *MOE).run_dir
        assert read_log(run_dir) == read_log(sync_dir)
        for step in (4, 8):
            for f in ("model", "optimizer"):
                assert_same_tensors(os.path.join(ckpt_path(run_dir, step), f),
                                    os.path.join(ckpt_path(sync_dir, step), f))


def test_resume_on_other_layouts(world2_runs):
    """The world-2 / sep-2 checkpoint of step 4, resumed by the same command at world 1, world 4
    with sep 1 (ZeRO-1 over 4 ranks) and world 4 with sep 2 (MoE: experts resharded): the run
    folder is the same (auto-resume finds it), and steps 4..7 and the val losses equal the
    uninterrupted world-2 run's within 1e-5 relative, and so do the grad norms (metrics.jsonl) and
    the final weights. Weights: AdamW divides each element's update by its own gradient scale, so an
    element whose gradient is near zero moves by up to lr * (relative rounding) differently: after 4
    steps at lr 1e-2 the weights agree to ~5e-6 absolute (as in the sep-2 export test); a wrong
    reshard (experts swapped, a shard dropped) differs by the weights' own size (~0.02)."""
    base, _ = world2_runs
    jobs = {(1, 1): [], (4, 1): [], (4, 2): []}
    for name, flags in VARIANTS.items():
        for layout, (world, sep) in LAYOUTS.items():
            jobs[world, sep].append((f"{base}/{name}-{layout}", [*flags, "--sep_size", str(sep)]))
    starts = _resume_on_layouts(jobs[1, 1])
    for rank_starts in run_distributed(_resume_on_layouts, 4, jobs[4, 1] + jobs[4, 2]):
        starts += rank_starts
    assert starts == [4] * len(starts)
    for name, flags in VARIANTS.items():
        ref_dir = tiny_config(f"{base}/{name}-uninterrupted", *flags).run_dir
        for layout in LAYOUTS:
            run_dir = tiny_config(f"{base}/{name}-{layout}", *flags).run_dir
            for kind in ("train", "val"):
                ref, got = read_log(ref_dir, kind), read_log(run_dir, kind)
                assert sorted(got) == sorted(ref)
                np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-5,
                                           err_msg=f"{name} {layout} {kind}")
            ref_norms, norms = ({r["step"]: r["train/grad_norm"] for r in
                                 read_records(os.path.join(d, METRICS_FILE))} for d in (ref_dir, run_dir))
            assert sorted(norms) == list(range(8))
            np.testing.assert_allclose([norms[s] for s in range(4, 8)], [ref_norms[s] for s in range(4, 8)],
                                       rtol=1e-5, err_msg=f"{name} {layout} grad norm")
            ref_w, got_w = (read_model_state(ckpt_path(d, 8)) for d in (ref_dir, run_dir))
            assert got_w.keys() == ref_w.keys()
            for key, w in ref_w.items():
                torch.testing.assert_close(got_w[key], w, rtol=1e-5, atol=2e-5, msg=f"{name} {layout} {key}")


# ---------------------------------------------------------------------- atomic saves
# Runs the tiny training through the real entry point, SIGKILLed while rank 0 writes meta.pt
# (the last file before COMPLETE) of the second checkpoint.
KILLED_IN_SAVE = """
import os, signal, sys, torch
from tinytron.training import checkpoint, run
real_save, metas = torch.save, []
def save(obj, path, *args, **kwargs):
    if isinstance(path, str) and os.path.basename(path) == "meta.pt":  # DCP saves into streams
        metas.append(path)
        if len(metas) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)
checkpoint.torch.save = save
run(argv=sys.argv[1:])
"""


class CrashAtRename(RuntimeError):
    pass


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """SIGKILL while writing checkpoint 8 (with --keep_last_n_checkpoints 1): checkpoint 4 is
    still there and complete, the half-written .tmp folder is ignored, and the next run resumes
    from 4, removes every .tmp folder (also one of a step it does not save) and reproduces the
    uninterrupted run bitwise. Same for a crash after COMPLETE was written into the .tmp folder
    but before its rename."""
    ref_dir, _ = resume_and_train(tmp_path / "ref")
    keep = ["--keep_last_n_checkpoints", "1"]
    r = run_script("-c", KILLED_IN_SAVE, *TINY_FLAGS, "--log_dir", str(tmp_path / "killed"), *keep, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run_dir = tiny_config(tmp_path / "killed").run_dir
    tmp = os.path.join(run_dir, "checkpoints", ".tmp_step_00000008")
    assert sorted(os.listdir(tmp)) == ["model", "optimizer", "rng"]  # died inside the save
    assert complete_steps(run_dir) == [4] and find_latest(run_dir) == ckpt_path(run_dir, 4)
    os.makedirs(os.path.join(run_dir, "checkpoints", ".tmp_step_00000005"))  # an older killed save

    assert resume_and_train(tmp_path / "killed", *keep) == (run_dir, 4)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000008"]
    for kind in ("train", "val"):
        assert read_log(run_dir, kind) == read_log(ref_dir, kind)
    assert_same_tensors(os.path.join(ckpt_path(run_dir, 8), "model"),
                        os.path.join(ckpt_path(ref_dir, 8), "model"))

    # Crash between COMPLETE and the rename: the .tmp folder is complete inside, still ignored.
    real_rename, renames = os.rename, []

    def rename(src, dst):
        if os.path.basename(dst).startswith("step_"):  # the checkpoint's, not DCP's .metadata
            renames.append(dst)
            if len(renames) == 2:
                raise CrashAtRename(dst)
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CrashAtRename):
        resume_and_train(tmp_path / "renamed")
    monkeypatch.undo()
    run_dir = tiny_config(tmp_path / "renamed").run_dir
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", ".tmp_step_00000008", COMPLETE))
    assert find_latest(run_dir) == ckpt_path(run_dir, 4)
    assert resume_and_train(tmp_path / "renamed") == (run_dir, 4)
    assert read_log(run_dir) == read_log(ref_dir) and complete_steps(run_dir) == [4, 8]


def test_keep_last_n_removes_old_only_after_new_is_complete(tmp_path, monkeypatch):
    """--keep_last_n_checkpoints 2, saves at 2, 4, 6, 8: checkpoint 2 is removed once 6 is
    complete, 4 once 8 is, each by its COMPLETE marker first; 6 and 8 remain, and no .tmp folder."""
    real_remove, real_rmtree, removals = os.remove, shutil.rmtree, []

    def remove(path, *args, **kwargs):
        if os.path.basename(path) == COMPLETE:
            folder = os.path.dirname(path)
            removals.append((os.path.basename(folder), complete_steps(os.path.dirname(os.path.dirname(folder)))))
        real_remove(path, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        assert not os.path.isfile(os.path.join(path, COMPLETE)), f"{path} deleted before its COMPLETE marker"
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(os, "remove", remove)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    run_dir, _ = resume_and_train(tmp_path, "--save_every_steps", "2", "--keep_last_n_checkpoints", "2")
    assert removals == [("step_00000002", [2, 4, 6]), ("step_00000004", [4, 6, 8])]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000006", "step_00000008"]
    removals.clear()  # more to keep than there are: nothing removed
    run_dir, _ = resume_and_train(tmp_path / "five", "--save_every_steps", "2", "--keep_last_n_checkpoints", "5")
    assert removals == [] and complete_steps(run_dir) == [2, 4, 6, 8]


# ---------------------------------------------------------------------- non-finite steps
class NaNTrainer(Trainer):
    """Multiplies the language-model loss by NaN at the (0-based) steps in `nan_steps`."""
    nan_steps = range(0)

    def _forward_loss(self, batch):
        lm, aux, expert_load = super()._forward_loss(batch)
        return (lm * float("nan") if self.step in self.nan_steps else lm), aux, expert_load


class SnapshotNaNTrainer(NaNTrainer):
    """Also keeps the parameters and the optimizer's per-parameter state after every step."""

    def train_step(self, batches):
        stats = super().train_step(batches)
        params = [p.detach().clone() for p in self.model.parameters()]
        state = [v.clone() for s in self.optimizer.optimizer.state.values() for v in s.values()]
        self.snapshots.append((params, state))
        return stats


def test_non_finite_steps_are_skipped(tmp_path):
    """NaN loss at steps 3 and 4: both are logged as skipped and counted, they change neither the
    parameters nor the optimizer state, and the run goes on with finite losses."""
    trainer = SnapshotNaNTrainer(tiny_config(tmp_path))
    trainer.nan_steps, trainer.snapshots = {3, 4}, []
    trainer.train()
    with open(os.path.join(trainer.run_dir, "log.txt")) as f:
        skipped = [line.split()[0] for line in f if line.split()[1] == "skipped"]
    assert skipped == ["3", "4"]
    train = read_log(trainer.run_dir)
    assert sorted(train) == [0, 1, 2, 5, 6, 7] and all(np.isfinite(list(train.values())))
    assert trainer.skipped_steps == 2 and trainer.consecutive_skips == 0
    assert torch.load(os.path.join(ckpt_path(trainer.run_dir, 8), "meta.pt"), weights_only=True)["skipped_steps"] == 2
    snaps = trainer.snapshots

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert same(snaps[2], snaps[3]) and same(snaps[2], snaps[4]) and not same(snaps[4], snaps[5])
    assert all(torch.isfinite(p).all() for p in snaps[-1][0])


NAN_FROM_STEP_2 = """
import sys
from tests.test_checkpoint import NaNTrainer
from tinytron.training import run
NaNTrainer.nan_steps = range(2, 10**9)
run(NaNTrainer, argv=sys.argv[1:])
"""


@pytest.fixture(scope="module")
def nan_stop(tmp_path_factory):
    """NaN from step 2 on, --max_skipped_steps 3, saving every 2 steps, run through the entry
    point (steps 2, 3 and 4 are skipped; checkpoint 4 is written after step 3);
    -> (finished process, log dir, flags)."""
    log_dir = tmp_path_factory.mktemp("nan_stop")
    flags = ["--save_every_steps", "2", "--max_skipped_steps", "3"]
    r = run_script("-c", NAN_FROM_STEP_2, *TINY_FLAGS, "--log_dir", str(log_dir), *flags, cwd=REPO)
    return r, log_dir, flags


def _max_skipped_error(run_dir: str) -> str:
    return (f"[tinytron] error: 3 consecutive steps with a non-finite loss or grad norm (--max_skipped_steps 3) "
            f"at step 4; last good checkpoint: {ckpt_path(run_dir, 4)}")


def test_too_many_non_finite_steps_stop_the_run(nan_stop):
    """Exit 1 with an error naming the flag and the last checkpoint, no traceback; checkpoints 2
    and 4 are complete and 4 holds the weights and optimizer state of 2 (the skipped steps
    changed nothing); a plain Trainer resumes from 4 and trains on with finite losses."""
    r, log_dir, flags = nan_stop
    run_dir = tiny_config(log_dir, *flags).run_dir
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.rstrip().endswith(_max_skipped_error(run_dir)) and "Traceback" not in r.stderr
    assert complete_steps(run_dir) == [2, 4]
    first, second = ckpt_path(run_dir, 2), ckpt_path(run_dir, 4)
    assert_same_tensors(os.path.join(first, "model"), os.path.join(second, "model"))
    assert_same_tensors(os.path.join(first, "optimizer"), os.path.join(second, "optimizer"), part="state")
    assert resume_and_train(log_dir, *flags) == (run_dir, 4)
    train = read_log(run_dir)
    assert sorted(train) == [0, 1, 4, 5, 6, 7] and all(np.isfinite(list(train.values())))


def test_training_error_is_printed_on_its_own_line(nan_stop):
    r, log_dir, flags = nan_stop
    assert r.stderr.endswith("\n" + _max_skipped_error(tiny_config(log_dir, *flags).run_dir) + "\n")


# ---------------------------------------------------------------------- bad input
def test_bad_input_one_line_error_and_nothing_overwritten(tmp_path):
    """`python pretrain_debug.py` (forked with torch imported: run_script) with: a --resume_path
    that does not exist; a --resume_path holding another model shape or another --seq_len; a
    --resume_path whose model shard or optimizer shard is truncated (named explicitly: no
    fallback); a --log_dir under a regular file (tests run as root, where chmod does not stop writes). Each exits 2
    with one line on stderr starting with "[tinytron] error:", leaves every existing file as it was,
    and creates no run folder."""
    src_dir, _ = resume_and_train(tmp_path / "src")
    cases = {}
    for name in ("model/__0_0.distcp", "optimizer/__0_0.distcp"):
        log_dir = tmp_path / f"corrupt-{os.path.dirname(name)}"
        shutil.copytree(src_dir, log_dir / os.path.basename(src_dir))
        checkpoint = ckpt_path(tiny_config(log_dir).run_dir, 8)
        path = os.path.join(checkpoint, name)
        os.truncate(path, os.path.getsize(path) // 2)
        cases[f"corrupt {name}"] = (["--log_dir", str(log_dir), "--resume_path", checkpoint], log_dir, "is corrupt")
    (tmp_path / "afile").write_text("not a folder\n")
    cases.update({
        "missing resume_path": (["--log_dir", str(tmp_path / "src"), "--resume_path", str(tmp_path / "nope")],
                                tmp_path / "src", "does not exist"),
        "other shape": (["--log_dir", str(tmp_path / "other"), "--hidden_size", "48", "--resume_path", src_dir],
                        tmp_path / "src", "--hidden_size 48 differs from 32 in the checkpoint"),
        "other seq_len": (["--log_dir", str(tmp_path / "other"), "--seq_len", "8", "--resume_path", src_dir],
                          tmp_path / "src", "--seq_len 8 differs from 16 in the checkpoint"),
        "unwritable log_dir": (["--log_dir", str(tmp_path / "afile" / "logs")], tmp_path / "afile",
                               "is not writable"),
    })
    before = {name: snapshot(str(watched)) for name, (_, watched, _) in cases.items()}
    for name, (flags, _, _) in cases.items():
        r = run_script("pretrain_debug.py", *TINY_FLAGS, *flags, cwd=REPO)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("[tinytron] error: "), (name, r.stderr)
        assert cases[name][2] in lines[0], f"{name}: {lines[0]}"
        assert snapshot(str(cases[name][1])) == before[name], name
    assert not (tmp_path / "other").exists()   # runs that never started leave no run folder
