"""Restarts, rewinds and resumed flags, through the real entry scripts with the default
--num_workers (gloo, CPU, fp32, the tiny model of tests/utils.py): a restart never goes backwards,
a rewind starts a new branch and moves the abandoned checkpoints aside, --skip_data_steps shifts
the data order exactly, changed hyper-parameters act, an unreadable newest checkpoint falls back,
checkpoints are fsynced, ranks agree on the checkpoint, and dropout differs across ranks.

Tolerances: as in test_checkpoint.py, the same layout replays the same fp32 operations (bitwise);
another layout only reorders sums (1e-5 relative); one optimizer step compared with a plain AdamW
that sees the whole global batch at once differs by the order of the micro-batch sums (1e-5
relative on the weights; AdamW's update is at most lr per element, so atol = 1e-6 covers weights
near zero).
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed
from tests.test_checkpoint import REPO, assert_same_tensors, ckpt_path, complete_steps, read_state, resume_and_train
from tests.test_metrics import _next_second, _tb_scalars
from tests.utils import TINY_FLAGS, read_log, tiny_config
from tinytron.data.mock import MockDataset
from tinytron.data.sampler import GlobalBatchSampler
from tinytron.model import GPT
from tinytron.training import Trainer
from tinytron.training import checkpoint as ckpt
from tinytron.training.config import ConfigError
from tinytron.training.metrics import METRICS_FILE, read_records
from tinytron.training.schedule import lr_at

EVERY_2 = ["--save_every_steps", "2"]
DEFAULT_WORKERS = ["--num_workers", "2"]  # the default; TINY_FLAGS set 0 for in-process runs


def copy_run(run_dir: str, log_dir) -> str:
    """A copy of a run folder under another log dir (same run name); -> the copy."""
    dest = os.path.join(log_dir, os.path.basename(run_dir))
    shutil.copytree(run_dir, dest)
    return dest


def cli(*args, torchrun=False, timeout=180):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "--max-restarts", "1"] if torchrun else []), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          # As scripts/launch.sh: restarted workers of torch 2.13 hang without it.
                          env={**os.environ, "PYTHONPATH": REPO, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The tiny run, 8 steps, checkpoints at 2, 4, 6, 8, TensorBoard on (world 1); -> its run folder."""
    return resume_and_train(tmp_path_factory.mktemp("base"), *EVERY_2, "--tensorboard")[0]


class RecordingTrainer(Trainer):
    """Keeps the micro-batches of every optimizer step: {step: [global batch sequences]}."""

    def train_step(self, batches):
        self.seen.setdefault(self.step, [])
        return super().train_step(batches)

    def _forward_loss(self, batch):
        self.seen[self.step].append(batch.clone())
        return super()._forward_loss(batch)


def _rewind(run_dir, *flags):
    """The rewind command of these tests: back to step 4, skipping 3 data steps."""
    return [*EVERY_2, "--resume_path", ckpt_path(run_dir, 4), "--skip_data_steps", "3", *flags]


@pytest.fixture(scope="module")
def skip_branch(base_run, tmp_path_factory):
    """The rewind to step 4 with --skip_data_steps 3 in a copy of base_run (world 1, in process),
    run to the end, its batches recorded; -> (run folder, batches, log of the whole branch)."""
    log_dir = tmp_path_factory.mktemp("skip")
    run_dir = copy_run(base_run, log_dir)
    _next_second()
    trainer = RecordingTrainer(tiny_config(log_dir, *_rewind(run_dir), "--tensorboard"))
    trainer.seen = {}
    assert trainer.step == 4 and trainer.data_offset == 3
    trainer.train()
    return run_dir, trainer.seen, read_log(run_dir)


def test_skip_data_steps_shifts_the_data_and_resumes_bitwise(base_run, skip_branch):
    """Rewound to step 4 with --skip_data_steps 3: optimizer step s trains on the global batch of
    data step s + 3 (the sampler's order, independently indexed here), recorded in the checkpoint
    (cumulative offset 3); the steps before 4 are the base run's, and log.txt, metrics.jsonl and
    TensorBoard hold each step once, the new branch's from 4 on. Re-running the same command
    after losing checkpoint 8 continues the branch from its checkpoint 6 (no second rewind, no
    second skip) and reproduces its losses and weights bitwise."""
    run_dir, seen, branch_log = skip_branch
    cfg = tiny_config(run_dir)
    t = cfg.training
    data = MockDataset(cfg.data.mock_data_num_samples, t.seq_len, cfg.model.vocab_size, t.seed, "train")
    sampler = GlobalBatchSampler(len(data), t.total_batch_size // t.seq_len, t.batch_size, 0, 1, t.seed)
    assert sorted(seen) == [4, 5, 6, 7]
    for step, micro in seen.items():
        got = torch.cat(micro)
        want = torch.stack([data[int(i)] for i in sampler.indices_of_step(step + 3)])
        unshifted = torch.stack([data[int(i)] for i in sampler.indices_of_step(step)])
        assert torch.equal(got, want) and not torch.equal(got, unshifted), step
    meta = ckpt.read_meta(ckpt_path(run_dir, 8))
    assert meta["data_offset"] == 3 and meta["data_position"]["step_in_epoch"] == 11 % (256 // 8)
    base = read_log(base_run)
    assert {s: branch_log[s] for s in range(4)} == {s: base[s] for s in range(4)}
    assert all(branch_log[s] != base[s] for s in range(4, 8))
    assert _metrics_steps(run_dir) == list(range(8))
    tb = _tb_scalars(run_dir, "train/loss")  # the old branch's steps 4-7 are purged
    assert [s for s, _ in tb] == list(range(8))
    np.testing.assert_allclose([v for _, v in tb], [branch_log[s] for s in range(8)], rtol=1e-6)

    final = os.path.join(ckpt_path(run_dir, 8), "model")
    kept = os.path.join(run_dir, "uninterrupted", "model")
    shutil.copytree(final, kept)
    shutil.rmtree(ckpt_path(run_dir, 8))
    trainer = Trainer(tiny_config(os.path.dirname(run_dir), *_rewind(run_dir)))
    assert (trainer.step, trainer.data_offset) == (6, 3)
    trainer.train()
    assert read_log(run_dir) == branch_log
    assert_same_tensors(final, kept)


def test_a_finished_branch_says_how_to_go_on_and_that_does_it(skip_branch, tmp_path, capsys):
    """The skip branch's command (--resume_path <its step 4> --skip_data_steps 3) run again once
    finished: one line, before the start block, whose advice leaves out --skip_data_steps. Followed
    (--resume_path <run>, a larger --max_steps), it starts a new run folder from step 8 and says so;
    the data order goes on where the branch stopped (step s trains on data step s + 3: the offset
    is kept, neither reset nor skipped again), and no --skip_data_steps change is printed."""
    run_dir = copy_run(skip_branch[0], tmp_path)
    capsys.readouterr()
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_config(tmp_path, *_rewind(run_dir)))
    assert str(e.value) == (
        f"{run_dir} is complete at step 8 of 8: to train it further, run with --resume_path {run_dir} and a "
        "--max_steps above 8, without --skip_data_steps (its data offset carries over), which starts a new run "
        "folder from its last checkpoint; for a new run, another --exp_name or --log_dir")
    assert "run folder:" not in capsys.readouterr().out
    trainer = RecordingTrainer(tiny_config(tmp_path, *EVERY_2, "--resume_path", run_dir, "--max_steps", "10"))
    trainer.seen = {}
    out = capsys.readouterr().out.splitlines()
    assert (trainer.step, trainer.data_offset) == (8, 3) and trainer.run_dir != run_dir
    assert f"[tinytron] run folder: {trainer.run_dir} (new, from {ckpt_path(run_dir, 8)} at step 8)" in out
    assert "[tinytron] resume: --max_steps 8 -> 10" in out and not [line for line in out if "skip_data" in line]
    trainer.train()
    cfg = trainer.config
    t = cfg.training
    data = MockDataset(cfg.data.mock_data_num_samples, t.seq_len, cfg.model.vocab_size, t.seed, "train")
    sampler = GlobalBatchSampler(len(data), t.total_batch_size // t.seq_len, t.batch_size, 0, 1, t.seed)
    assert sorted(trainer.seen) == [8, 9]
    for step, micro in trainer.seen.items():
        assert torch.equal(torch.cat(micro), torch.stack([data[int(i)] for i in sampler.indices_of_step(step + 3)]))


def _metrics_steps(run_dir: str) -> list[int]:
    return [r["step"] for r in read_records(os.path.join(run_dir, METRICS_FILE))]


def test_rewind_restart_and_keep_last_n_under_torchrun(base_run, skip_branch, tmp_path):
    """torchrun, 2 ranks, default workers, --max-restarts 1: the rewind command of
    test_skip_data_steps... with --keep_last_n_checkpoints 1 moves checkpoints 6 and 8 aside
    (kept, complete), rewinds log.txt and metrics.jsonl to step 4, saves 6 (deleting 2 and 4,
    never 6), then every rank crashes. The restart (same command; its --resume_path is gone)
    continues the new branch from 6: one rewind, each step logged once, losses equal to the
    world-1 branch (1e-5: another layout), and only checkpoint 8 is left."""
    run_dir = copy_run(base_run, tmp_path)
    r = cli("tests/crash_worker.py", *TINY_FLAGS, *DEFAULT_WORKERS, "--log_dir", str(tmp_path),
            *_rewind(run_dir), "--keep_last_n_checkpoints", "1", "--crash_after_save", "6",
            torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("new branch") == 1 and r.stdout.count("moved 2 checkpoint(s) of the abandoned branch") == 1
    assert f"resumed from {ckpt_path(run_dir, 6)} at step 6 (data step 9)" in r.stdout
    assert complete_steps(run_dir) == [8]
    (aside,) = os.listdir(os.path.join(run_dir, "checkpoints", ckpt.ABANDONED))
    aside = os.path.join(run_dir, "checkpoints", ckpt.ABANDONED, aside)
    assert [os.path.basename(p) for p in ckpt.list_complete(aside)] == ["step_00000006", "step_00000008"]
    assert_same_tensors(os.path.join(aside, "step_00000008", "model"), os.path.join(ckpt_path(base_run, 8), "model"))
    got, want = read_log(run_dir), skip_branch[2]
    assert sorted(got) == list(range(8))
    np.testing.assert_allclose([got[s] for s in range(8)], [want[s] for s in range(8)], rtol=1e-5)
    assert _metrics_steps(run_dir) == list(range(8))
    records = read_records(os.path.join(run_dir, METRICS_FILE))
    assert [round(r["train/loss"], 6) for r in records] == [got[s] for s in range(8)]


def test_restart_with_resume_path_continues_its_own_checkpoints(base_run, tmp_path):
    """Run B starts from run A's checkpoint 4 (--resume_path; a longer schedule), saves 6 and 8,
    then every rank crashes; the restart of the same command resumes B's own checkpoint 8, not
    A's 4: B's log keeps steps 4-7 and logs each step once."""
    flags = [*TINY_FLAGS, *DEFAULT_WORKERS, *EVERY_2, "--log_dir", str(tmp_path), "--max_steps", "12",
             "--resume_path", ckpt_path(base_run, 4)]
    r = cli("tests/crash_worker.py", *flags, "--crash_after_save", "8", torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tiny_config(tmp_path, "--max_steps", "12").run_dir
    assert r.stdout.count(f"resumed from {ckpt_path(base_run, 4)} at step 4 (data step 4, new branch)") == 1
    assert f"resumed from {ckpt_path(run_dir, 8)} at step 8 (data step 8)" in r.stdout
    assert "[tinytron] resume: --max_steps 8 -> 12" in r.stdout
    assert sorted(read_log(run_dir)) == list(range(4, 12)) and _metrics_steps(run_dir) == list(range(4, 12))
    assert complete_steps(run_dir) == [6, 8, 10, 12] and complete_steps(base_run) == [2, 4, 6, 8]


NEW_HPARAMS = {"--weight_decay": "0.0", "--beta1": "0.8", "--beta2": "0.9", "--adam_eps": "1e-4",
               "--grad_clip_value": "0.05", "--max_lr": "5e-3", "--min_lr": "5e-4", "--warmup_steps": "1",
               "--max_steps": "5"}


def _reference_step(checkpoint: str, cfg, lr: float, weight_decay, betas, eps, clip):
    """Step `checkpoint`'s step of a plain GPT + torch.optim.AdamW loaded from the checkpoint's
    files, on the whole global batch at once; -> ({name: weight}, grad norm before clipping)."""
    t = cfg.training
    model = GPT(cfg.model)
    model.load_state_dict(read_state(os.path.join(checkpoint, "model")))
    params = dict(model.named_parameters())
    decay = [n for n, p in params.items() if p.dim() >= 2 and "embed" not in n]
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": weight_decay},
                             {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    saved = read_state(os.path.join(checkpoint, "optimizer"))["state"]
    for name, p in params.items():
        opt.state[p] = {k: v.clone() for k, v in saved[name].items()}
    data = MockDataset(cfg.data.mock_data_num_samples, t.seq_len, cfg.model.vocab_size, t.seed, "train")
    step = ckpt.read_meta(checkpoint)["step"]
    sampler = GlobalBatchSampler(len(data), t.total_batch_size // t.seq_len, t.batch_size, 0, 1, t.seed)
    batch = torch.stack([data[int(i)] for i in sampler.indices_of_step(step)])
    _, loss = model(batch[:, :-1], targets=batch[:, 1:])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    opt.step()
    return {n: p.detach() for n, p in params.items()}, norm


def test_changed_hyper_parameters_act_on_resume(base_run, tmp_path):
    """Resuming A's checkpoint 4 with other weight decay, betas, eps, clipping and schedule: each
    change is printed once, and the weights after one step equal a plain AdamW step with the NEW
    values from A's weights and moments, and differ from one with A's values."""
    flags = [f for kv in NEW_HPARAMS.items() for f in kv]
    r = cli("pretrain_debug.py", *TINY_FLAGS, *DEFAULT_WORKERS, "--log_dir", str(tmp_path),
            "--resume_path", ckpt_path(base_run, 4), *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    old = tiny_config(tmp_path)
    for flag, value in NEW_HPARAMS.items():
        was = vars(old.optim).get(flag[2:], vars(old.training).get(flag[2:]))
        assert r.stdout.count(f"[tinytron] resume: {flag} {was} -> {type(was)(value)}") == 1, flag
    cfg = tiny_config(tmp_path, *flags)
    got = read_state(os.path.join(ckpt_path(cfg.run_dir, 5), "model"))
    o = cfg.optim
    lr = lr_at(4, o.max_lr, o.min_lr, o.warmup_steps, cfg.training.max_steps)
    new, norm = _reference_step(ckpt_path(base_run, 4), cfg, lr, o.weight_decay, (o.beta1, o.beta2), o.adam_eps,
                          cfg.training.grad_clip_value)
    o = old.optim
    stale, _ = _reference_step(ckpt_path(base_run, 4), cfg, lr, o.weight_decay, (o.beta1, o.beta2), o.adam_eps,
                            old.training.grad_clip_value)
    assert norm > cfg.training.grad_clip_value  # the new clipping acts
    for name, want in new.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert max((got[n] - stale[n]).abs().max().item() for n in new) > 1e-3


def test_unreadable_newest_checkpoint_falls_back(base_run, tmp_path):
    """Newest checkpoint's model shard truncated: the same command warns with its path, resumes
    checkpoint 6, moves the unreadable one aside, and reproduces the run (bitwise, same layout)."""
    run_dir = copy_run(base_run, tmp_path)
    bad = os.path.join(ckpt_path(run_dir, 8), "model")
    shard = os.path.join(bad, "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    r = cli("pretrain_debug.py", *TINY_FLAGS, *DEFAULT_WORKERS, *EVERY_2, "--log_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[tinytron] warning: model state in {bad} is corrupt or unreadable" in r.stderr
    assert f"resumed from {ckpt_path(run_dir, 6)} at step 6" in r.stdout
    (aside,) = os.listdir(os.path.join(run_dir, "checkpoints", ckpt.ABANDONED))
    assert os.listdir(os.path.join(run_dir, "checkpoints", ckpt.ABANDONED, aside)) == ["step_00000008"]
    assert complete_steps(run_dir) == [2, 4, 6, 8] and read_log(run_dir) == read_log(base_run)
    assert_same_tensors(os.path.join(ckpt_path(run_dir, 8), "model"), os.path.join(ckpt_path(base_run, 8), "model"))


def test_checkpoint_files_are_fsynced_before_complete(tmp_path, monkeypatch):
    """Every file of the checkpoint is fsynced before COMPLETE is written; the checkpoints folder
    is fsynced after the rename (so the rename survives a power loss)."""
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    run_dir, _ = resume_and_train(tmp_path, "--max_steps", "2", "--warmup_steps", "1", *EVERY_2,
                                 "--no-do_val")
    root = os.path.realpath(os.path.join(run_dir, "checkpoints"))
    tmp = os.path.join(root, ".tmp_step_00000002")
    files = [os.path.join(d, f).replace(ckpt.step_dir(root, 2), tmp)
             for d, _, names in os.walk(ckpt.step_dir(root, 2)) for f in names if f != ckpt.COMPLETE]
    marker = synced.index(os.path.join(tmp, ckpt.COMPLETE))
    assert len(files) >= 4 and set(files) <= set(synced[:marker])
    assert root in synced[marker:]


def _ranks_and_dropout(log_dir):
    """World 2. (1) Rank 1 sees no checkpoint (as a stale file-system cache would), rank 0 sees
    checkpoint 8: both resume 8. (2) Dropout 0.5, DP 2 and SEP 2: the embedding
    dropout mask of the same batch on each rank, and whether the weights are the same on both
    ranks; -> (resumed step, {sep: (mask, weights equal)})."""
    resume_and_train(f"{log_dir}/agree")
    real = ckpt.list_complete
    if dist.get_rank() == 1:
        ckpt.list_complete = lambda root: []
    try:
        step = Trainer(tiny_config(f"{log_dir}/agree")).step
    except ConfigError as e:   # the run is finished: the one-line error names the step it resumed
        step = int(re.search(r" is complete at step (\d+) of ", str(e)).group(1))
    ckpt.list_complete = real
    masks = {}
    for sep in (1, 2):
        trainer = Trainer(tiny_config(f"{log_dir}/dropout{sep}", "--dropout", "0.5", "--sep_size", str(sep)))
        out = []
        trainer.model.dropout.register_forward_hook(lambda m, i, o, out=out: out.append(o.detach() == 0))
        trainer.model.train()
        trainer._forward_loss(torch.stack([trainer.train_dataset[i] for i in range(2)]))
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        gathered = [torch.empty_like(weights) for _ in range(2)]
        dist.all_gather(gathered, weights)
        masks[sep] = (out[0], torch.equal(*gathered))
    return step, masks


def test_ranks_agree_on_the_checkpoint_and_dropout_differs(tmp_path):
    """The checkpoint to resume is chosen on rank 0 and shared. With dropout, DP replicas and the
    two SEP chunks of one sequence draw different masks (about half the elements differ), while
    the weights stay the same on every rank."""
    (step0, masks0), (step1, masks1) = run_distributed(_ranks_and_dropout, 2, str(tmp_path))
    assert step0 == step1 == 8
    for sep in (1, 2):
        a, b = masks0[sep][0], masks1[sep][0]
        assert a.shape == b.shape and masks0[sep][1] and masks1[sep][1]
        assert 0.4 < a.float().mean() < 0.6 and 0.3 < (a != b).float().mean() < 0.7, sep
