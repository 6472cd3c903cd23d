"""Trainer-level tests on CPU: learning, exact resume, bad input (data-parallel parity:
tests/test_parallel_training.py)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.dist_helper import free_port, run_script
from tests.utils import TINY_FLAGS, launch_env, read_log, tiny_config
from tinytron.data.sampler import GlobalBatchSampler
from tinytron.training import Trainer
from tinytron.training.checkpoint import find_latest, list_complete
from tinytron.training.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(log_dir, *flags):
    """Run a tiny Trainer to the end in this process (or in each rank); return its run dir."""
    trainer = Trainer(tiny_config(log_dir, *flags))
    trainer.train()
    return trainer.run_dir


def test_loss_decreases(tmp_path):
    run_dir = train(tmp_path, "--max_steps", "60", "--warmup_steps", "3", "--no-do_save")
    losses = read_log(run_dir)
    assert sorted(losses) == list(range(60))
    assert np.mean([losses[s] for s in range(55, 60)]) < 0.7 * losses[0]
    val = read_log(run_dir, "val")
    assert sorted(val) == list(range(3, 60, 4))  # every 4 steps; the last step is one of them
    assert val[59] < 0.7 * val[3]


def test_sampler_is_layout_invariant():
    """The sequences of each optimizer step depend only on (seed, epoch, step, global batch)."""
    def steps(dp_size, micro):
        out = []
        samplers = [GlobalBatchSampler(100, 8, micro, r, dp_size, seed=1) for r in range(dp_size)]
        iters = [iter(s) for s in samplers]
        for _ in range(30):  # crosses epochs: 12 steps per epoch
            out.append(sorted(i for it in iters for _ in range(8 // (micro * dp_size)) for i in next(it)))
        return out
    reference = steps(1, 8)
    assert steps(1, 2) == reference and steps(2, 1) == reference and steps(4, 2) == reference
    assert reference[0] != reference[12]  # a new epoch is a new permutation
    assert sorted(i for s in reference[:12] for i in s) == sorted(set(i for s in reference[:12] for i in s))


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Train 8 steps saving at 4 and 8; drop the step-8 checkpoint (as if the job died after
    step 6) and run the same command again: it resumes at 4, rewinds log.txt and reproduces
    steps 4..7 bitwise."""
    run_dir = train(tmp_path)
    full_train, full_val = read_log(run_dir), read_log(run_dir, "val")
    assert [os.path.basename(p) for p in list_complete(os.path.join(run_dir, "checkpoints"))] == \
        ["step_00000004", "step_00000008"]
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_00000008"))
    assert find_latest(run_dir).endswith("step_00000004")
    assert train(tmp_path) == run_dir
    assert read_log(run_dir) == full_train  # bitwise: same floats, each step once
    assert read_log(run_dir, "val") == full_val


def _cli(*flags, nproc=None):
    cmd = [sys.executable, "pretrain_debug.py"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "pretrain_debug.py"]  # --standalone: a free rendezvous port, not 29500
    return subprocess.run(cmd + list(flags), cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, message", [
    (["--total_batch_size", "100"], "--total_batch_size 100 is not divisible by --batch_size 2 x --seq_len 16"),
    (["--warmup_steps", "8"], "--warmup_steps 8 must be smaller than --max_steps 8"),
    (["--hidden_size", "30"], "--hidden_size 30 is not divisible by --num_attention_heads 4"),
    (["--resume_path", "/nonexistent/run"], "--resume_path /nonexistent/run does not exist"),
    (["--skip_data_steps", "-1"], "--skip_data_steps -1 must be >= 0"),
    (["--grad_clip_value", "-1"], "--grad_clip_value -1.0 must be >= 0"),
    (["--keep_last_n_checkpoints", "-2"], "--keep_last_n_checkpoints -2 must be >= 0"),
    (["--log_expert_load"], "--log_expert_load needs --use_moe"),
    (["--seq_len", "15", "--sep_size", "1", "--block_size", "8"], "--seq_len 15 exceeds --block_size 8"),
    (["--backend", "nccl"], "--backend nccl needs --device cuda"),  # from distributed/runtime.py
    pytest.param(["--device", "cuda"], "--device cuda but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")),
])
def test_bad_flags_one_line_error(tmp_path, flags, message):
    """pretrain_debug.py forked with torch imported (the real interpreter's start: the other _cli tests)."""
    r = run_script("pretrain_debug.py", *TINY_FLAGS, "--log_dir", str(tmp_path), *flags, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {r.stderr.strip()[7:]}" and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_torch_older_than_the_floor_is_one_line(tmp_path):
    """pretrain_debug.py under a torch that reports 2.10 (patched before the entry script runs)."""
    code = ("import runpy, sys, torch; torch.__version__ = '2.10.1+cu128'; sys.argv[0] = 'pretrain_debug.py'; "
            "runpy.run_path('pretrain_debug.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, *TINY_FLAGS, "--log_dir", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: torch 2.10.1+cu128 is installed; Tinytron needs torch >= 2.11 " \
        "(pip install 'torch>=2.11')"


def test_console_says_where_things_are(tmp_path):
    """The start block, validation losses and each save on lines of their own (pretrain_debug.py)."""
    r = _cli(*TINY_FLAGS, "--log_dir", str(tmp_path), "--tensorboard")
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    lines = r.stdout.splitlines()
    for line in (f"[tinytron] run folder: {run_dir} (new)",
                 "[tinytron] layout: world 1 = dp 1 x sep 1, ZeRO-1, cpu, fp32",
                 "[tinytron] model: 2 layers x 32, 0.02M parameters on this rank",
                 "[tinytron] steps: 8 of 128 tokens (8 x 16; micro-batch 2, grad accumulation 4)",
                 "[tinytron] data: MockDataset, 256 training / 25 validation sequences",
                 f"[tinytron] TensorBoard: tensorboard --logdir {run_dir}/tb"):
        assert line in lines, (line, lines[:12])
    assert [line.split("|")[0].split()[1] for line in lines if "| val loss" in line] == ["3", "7"]
    saved = [line for line in lines if line.startswith("[tinytron] saved ")]
    assert [s.split()[2] for s in saved] == [f"{run_dir}/checkpoints/step_0000000{n}" for n in (4, 8)], saved


def test_flag_typos_are_refused_with_the_nearest_flag(tmp_path):
    """No prefix matching: `--max_step` is not taken for --max_steps."""
    r = _cli(*TINY_FLAGS, "--log_dir", str(tmp_path), "--max_step", "5")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unrecognized arguments: --max_step 5 (did you mean --max_steps?)"


def test_items_of_the_wrong_length_are_one_line(tmp_path):
    class Short(Trainer):
        def _init_dataset(self):
            train, val = super()._init_dataset()
            return [train[i][:-1] for i in range(len(train))], val
    with pytest.raises(ConfigError, match=r"^item 0 of the training set \(list\) has 16 tokens; each item must "
                       r"hold --seq_len \+ 1 = 17 \(inputs and next-token targets\)$"):
        Short(tiny_config(tmp_path))


CUSTOM_DATA_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from tinytron.training import Trainer, run
from tinytron.training.arguments import build_parser

class Windows(torch.utils.data.Dataset):
    def __init__(self, tokens, seq_len):
        self.tokens, self.seq_len = tokens, seq_len
    def __len__(self):
        return (len(self.tokens) - 1) // self.seq_len
    def __getitem__(self, i):
        return self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1]

class MyTrainer(Trainer):
    def _init_dataset(self):
        tokens = torch.load(os.environ["TOKENS"])
        seq_len = self.config.training.seq_len
        return Windows(tokens[:4000], seq_len), Windows(tokens[4000:], seq_len)

if __name__ == "__main__":
    run(MyTrainer, build_parser())
"""


def test_custom_data_is_part_of_the_run_identity(tmp_path):
    """README's custom-data Trainer, run as a user runs it (python my_script.py, same flags): other
    data starts a run folder of its own (trains, exit 0) instead of resuming the finished one; the
    same data again finds its finished run (one line, exit 2)."""
    script = tmp_path / "my_pretrain.py"
    script.write_text(CUSTOM_DATA_SCRIPT.format(repo=REPO))
    flags = [f for f in TINY_FLAGS if f != "--use_mock_data"] + ["--log_dir", str(tmp_path / "logs")]
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        torch.save(torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(seed)), tmp_path / name)

    def train_on(name):
        return subprocess.run([sys.executable, str(script), *flags], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "TOKENS": str(tmp_path / name)})
    first = train_on("a.pt")
    assert first.returncode == 0, first.stderr[-2000:]
    (run_a,) = os.listdir(tmp_path / "logs")
    assert "data: Windows, 249 training / 62 validation sequences (identity " in first.stdout
    other = train_on("b.pt")
    assert other.returncode == 0, other.stderr[-2000:]
    (run_b,) = set(os.listdir(tmp_path / "logs")) - {run_a}
    assert sorted(read_log(tmp_path / "logs" / run_b)) == list(range(8))
    again = train_on("a.pt")
    assert again.returncode == 2
    assert again.stderr.strip().startswith(f"error: {tmp_path / 'logs' / run_a} is complete at step 8 of 8")


def test_a_run_shorter_than_its_warmup_warns(tmp_path, capsys):
    """One epoch of 16 mock sequences at 8 per step (128 tokens of 16) is 2 steps."""
    Trainer(tiny_config(tmp_path, "--max_steps", "0", "--max_epochs", "1", "--mock_data_num_samples", "16",
                        "--warmup_steps", "5"))
    assert "[tinytron] warning: --warmup_steps 5 >= the run's 2 steps: the learning rate never leaves warmup" \
        in capsys.readouterr().out
    from tinytron.training.preflight import short_run_warnings
    scored = tiny_config(tmp_path, "--eval_tasks", "tasks.jsonl", "--eval_every_steps", "10")
    assert short_run_warnings(scored, 8) == [
        "--eval_every_steps 10 > the run's 8 steps: --eval_tasks are scored once, at the end"]
    assert short_run_warnings(tiny_config(tmp_path, "--eval_tasks", "tasks.jsonl", "--eval_every_steps", "8"), 8) == []


def test_unknown_precision_is_rejected(tmp_path):
    r = _cli(*TINY_FLAGS, "--precision", "fp8")
    assert r.returncode == 2 and "--precision: invalid choice: 'fp8'" in r.stderr


def test_bad_flag_fails_on_every_rank(tmp_path):
    """Each rank validates before any process group exists: both ranks of a 2-rank job print the
    line and exit 2 on their own (no hang waiting for a peer)."""
    procs = [subprocess.Popen([sys.executable, "pretrain_debug.py", *TINY_FLAGS, "--log_dir", str(tmp_path),
                               "--sep_size", "3"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2 and err.strip() == "error: world size 2 is not divisible by --sep_size 3"
    # Under torchrun the job fails as a whole (torchrun stops the other rank once one has failed).
    r = _cli(*TINY_FLAGS, "--log_dir", str(tmp_path), "--sep_size", "3", nproc=2)
    assert r.returncode != 0 and "error: world size 2 is not divisible by --sep_size 3" in r.stderr
    assert "trainer.py" not in r.stderr  # no traceback from our code


def _error_lines(stderr: str) -> list[str]:
    """stderr without torchrun's OMP_NUM_THREADS notice (W... lines) and the launcher's python line."""
    return [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"W\d{4} ", line) and not line.startswith("[launch] python: ")]


def test_bad_input_under_tinytron_torchrun_is_one_line(tmp_path):
    """tinytron-torchrun (torchrun with the same flags) and the scripts (which run it): bad input
    the workers find is the one line, printed once, exit 2, with nothing from torchrun (no log of
    failed workers, no traceback): a typo, and through a script a --device the machine lacks (only
    workers find it: the preflight checks flags), also when torchrun restarts the workers."""
    typo = "error: unrecognized arguments: --max_step 5 (did you mean --max_steps?)"
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "tinytron-torchrun"), "--standalone",
                        "--nproc_per_node", "2", "pretrain_debug.py", *TINY_FLAGS, "--log_dir", str(tmp_path),
                        "--max_step", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (r.returncode, _error_lines(r.stderr)) == (2, [typo]), r.stderr

    if not torch.cuda.is_available():
        r = subprocess.run(["bash", "scripts/debug_cpu/pretrain.sh", "--log_dir", str(tmp_path), "--device", "cuda"],
                           cwd=REPO, capture_output=True, text=True, timeout=180,
                           env={**launch_env(), "MAX_RESTARTS": "1"})
        assert (r.returncode, _error_lines(r.stderr)) == (2, [
            "error: --device cuda but no CUDA device is available (--device auto picks CUDA when there is one, "
            "else the CPU)"]), r.stderr


def test_debug_cpu_script_runs(tmp_path):
    """The README's laptop command, shortened: torchrun, 2 processes, gloo, mock data. The same
    command again finds the finished run: one line naming it, exit 2, no traceback (the launcher's
    preflight, before torchrun); resumed by a longer run (no MASTER_PORT: a free port) it goes on."""
    logs = tmp_path / "logs"

    def script(*flags, **env):
        return subprocess.run(["bash", "scripts/debug_cpu/pretrain.sh", "--log_dir", str(logs), *flags],
                              cwd=REPO, capture_output=True, text=True, timeout=180, env={**launch_env(), **env})
    r = script("--max_steps", "12", MASTER_PORT=str(free_port()))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[tinytron] warning: --val_every_steps 20 > the run's 12 steps: validation runs once, at the end" in r.stdout
    (run_dir,) = [os.path.join(logs, d) for d in os.listdir(logs)]
    losses = read_log(run_dir)
    assert len(losses) == 12 and losses[11] < losses[0]
    again = script("--max_steps", "12", MASTER_PORT=str(free_port()))
    assert again.returncode == 2
    assert again.stderr.splitlines() == [f"[launch] python: {sys.executable}",
                                         f"error: {run_dir} is complete at step 12 of 12: to train it further, "
                                         f"add --resume_path {run_dir} and a larger --max_steps; for a new run, "
                                         "another --exp_name or --log_dir"]
    more = script("--max_steps", "14", "--resume_path", run_dir)   # --max_steps is in the run's hash
    assert more.returncode == 0, more.stderr[-2000:]
    (longer,) = [os.path.join(logs, d) for d in os.listdir(logs) if os.path.join(logs, d) != run_dir]
    assert sorted(read_log(longer)) == [12, 13]


def test_trainer_matches_a_plain_pytorch_loop(tmp_path):
    """An independent reference for the Trainer's own glue (accumulation, loss scaling, clipping,
    param groups, schedule): 3 steps of a hand-written loop: one forward of the whole global batch,
    mean cross-entropy, torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW with decay on the
    non-embedding matrices. The Trainer splits the batch into 4 micro-steps, so sums are ordered
    differently: 1e-5 relative."""
    import torch

    from tinytron.data.mock import MockDataset
    from tinytron.model import GPT
    from tinytron.training.schedule import lr_at
    cfg = tiny_config(tmp_path, "--no-do_save", "--no-do_val", "--max_steps", "3", "--grad_clip_value", "0.5")
    trainer = Trainer(cfg)
    assert trainer.grad_accum_steps == 4
    trainer.train()

    t, o = cfg.training, cfg.optim
    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    params = dict(model.named_parameters())
    init = {name: p.detach().clone() for name, p in params.items()}
    decay = [p for n, p in params.items() if p.dim() >= 2 and n != "embed.weight"]
    no_decay = [p for n, p in params.items() if not (p.dim() >= 2 and n != "embed.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], betas=(o.beta1, o.beta2), eps=o.adam_eps)
    data = MockDataset(cfg.data.mock_data_num_samples, t.seq_len, cfg.model.vocab_size, t.seed)
    sampler = GlobalBatchSampler(len(data), t.total_batch_size // t.seq_len, 8, 0, 1, t.seed)
    losses, norms = [], []
    for step in range(3):
        batch = torch.stack([data[int(i)] for i in sampler.indices_of_step(step)])
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_value).item())
        for g in opt.param_groups:
            g["lr"] = lr_at(step, o.max_lr, o.min_lr, o.warmup_steps, 3)
        opt.step()
        losses.append(loss.item())
    assert min(norms) > t.grad_clip_value  # clipping was active
    got = read_log(trainer.run_dir)
    np.testing.assert_allclose([got[s] for s in range(3)], losses, rtol=1e-5)
    # Weights: AdamW's update m / (sqrt(v) + eps) is about +-lr for every element, even for one
    # whose gradient is at rounding level, where the sum order flips it: an elementwise 1e-5 then
    # fails by machine (BLAS kernel) alone. The whole update of each tensor is compared instead.
    for name, p in trainer.model.named_parameters():
        got_update, want_update = p.detach() - init[name], params[name].detach() - init[name]
        assert (got_update - want_update).norm() <= 1e-5 * want_update.norm(), name


def test_profiler_writes_a_chrome_trace(tmp_path):
    run_dir = train(tmp_path, "--no-do_save", "--max_steps", "4", "--use_profiler", "--steps_to_profile", "1", "2")
    with open(os.path.join(run_dir, "rank0_trace.json")) as f:
        trace = json.load(f)
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])


class OverridingTrainer(Trainer):
    """Overrides every documented point, each returning what it builds (see trainer.py)."""

    def _init_dataset(self):
        constant = torch.full((self.config.training.seq_len + 1,), 7)  # every token is 7
        return [constant] * 64, [constant] * 8

    def _init_model(self):
        model = super()._init_model()
        self.inputs = []  # every input the model was called with
        model.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0].clone()))
        return model

    def _init_optimizer(self):
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=0.0)
        return self.sgd

    def _lr_at(self, step):
        return 0.25 * (step + 1)


def test_every_override_point_is_used(tmp_path):
    """_init_dataset's data reaches the model, _init_model's model is the one trained,
    _init_optimizer's optimizer is the one stepped (wrapped for ZeRO-1) with _lr_at's lr."""
    trainer = OverridingTrainer(tiny_config(tmp_path, "--no-do_save", "--max_steps", "2", "--warmup_steps", "1",
                                            "--val_every_steps", "2", "--grad_clip_value", "0"))
    model, before = trainer.model, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(trainer.inputs) == 2 * trainer.grad_accum_steps + 4  # 2 steps, then 8 val sequences in 4 batches
    assert all(bool((x == 7).all()) for x in trainer.inputs)
    assert trainer.model is model and trainer.optimizer.optimizer is trainer.sgd
    assert [g["lr"] for g in trainer.sgd.param_groups] == [0.5]  # _lr_at(1), the last step's
    with open(os.path.join(trainer.run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["train/lr"] for line in f] == [0.25, 0.5]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "embed" not in n)


def test_init_dataset_must_return_the_datasets(tmp_path):
    class OldStyleTrainer(Trainer):
        def _init_dataset(self):
            self.train_dataset = self.val_dataset = None

    with pytest.raises(TypeError, match=r"_init_dataset must return \(train_dataset, val_dataset\)"):
        OldStyleTrainer(tiny_config(tmp_path, "--no-do_save"))


def test_runtime_of_a_single_process(monkeypatch):
    """Without WORLD_SIZE (python, not torchrun) init_runtime only picks the device: what the
    Trainer, the benchmarks and single-process generation share."""
    from tinytron.distributed.runtime import RuntimeSetupError, init_runtime, pick_device
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runtime = init_runtime("cpu")
    assert (runtime.device, runtime.rank, runtime.world_size, runtime.is_main) == (torch.device("cpu"), 0, 1, True)
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RuntimeSetupError, match="--backend nccl needs --device cuda"):
        init_runtime("cpu", backend="nccl")
