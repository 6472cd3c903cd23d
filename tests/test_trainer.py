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
from tests.docs import doc_block, doc_command, doc_output
from tests.utils import TINY_FLAGS, launch_env, read_log, tiny_config
from tinytron.data.sampler import GlobalBatchSampler
from tinytron.data.token_dataset import TokenWindowDataset
from tinytron.data.tokenize import INDEX_FILE, TOKENS_FILE
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
    if nproc is None:
        return run_script("pretrain_debug.py", *flags, cwd=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "pretrain_debug.py"]  # --standalone: a free rendezvous port, not 29500
    return subprocess.run(cmd + list(flags), cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, message", [
    (["--total_batch_size", "100"], "--total_batch_size 100 is not divisible by --batch_size 2 x --seq_len 16"),
    (["--warmup_steps", "8"], "--warmup_steps 8 must be smaller than --max_steps 8"),
    (["--hidden_size", "30"], "--hidden_size 30 is not divisible by --num_attention_heads 4"),
    (["--resume_path", "/nonexistent/run"], "--resume_path /nonexistent/run does not exist"),
    (["--skip_data_steps", "-1"], "--skip_data_steps -1 must be >= 0"),
    (["--grad_clip_value", "-1"], "--grad_clip_value -1.0 must be >= 0"),
    (["--max_lr", "-1e-3"], "--max_lr -0.001 must be positive"),   # a negative number in e-notation is a value
    (["--keep_last_n_checkpoints", "-2"], "--keep_last_n_checkpoints -2 must be >= 0"),
    (["--log_expert_load"], "--log_expert_load needs --use_moe"),
    (["--seq_len", "15", "--sep_size", "1", "--block_size", "8"], "--seq_len 15 exceeds --block_size 8"),
    (["--backend", "nccl"], "--backend nccl needs --device cuda"),  # from distributed/runtime.py
    pytest.param(["--device", "cuda"], "--device cuda but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")),
])
def test_bad_flags_one_line_error(tmp_path, flags, message):
    """pretrain_debug.py forked with torch imported (the real interpreter's start: the torchrun tests)."""
    r = _cli(*TINY_FLAGS, "--log_dir", str(tmp_path), *flags)
    assert r.returncode == 2
    assert r.stderr.strip() == f"[tinytron] error: {r.stderr.strip()[18:]}" and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_torch_older_than_the_floor_is_one_line(tmp_path):
    """pretrain_debug.py under a torch that reports 2.10 (patched before the entry script runs)."""
    code = ("import runpy, sys, torch; torch.__version__ = '2.10.1+cu128'; sys.argv[0] = 'pretrain_debug.py'; "
            "runpy.run_path('pretrain_debug.py', run_name='__main__')")
    r = run_script("-c", code, *TINY_FLAGS, "--log_dir", str(tmp_path), cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == "[tinytron] error: torch 2.10.1+cu128 is installed; Tinytron needs torch >= 2.11 " \
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
    assert [line.split("|")[0].split()[-1] for line in lines if "| val loss" in line] == ["3", "7"]
    saved = [line for line in lines if line.startswith("[tinytron] saved ")]
    assert [s.split()[2] for s in saved] == [f"{run_dir}/checkpoints/step_0000000{n}" for n in (4, 8)], saved


def test_flag_typos_are_refused_with_the_nearest_flag(tmp_path):
    """No prefix matching: `--max_step` is not taken for --max_steps."""
    r = _cli(*TINY_FLAGS, "--log_dir", str(tmp_path), "--max_step", "5")
    assert r.returncode == 2
    assert r.stderr.strip() == "[tinytron] error: unrecognized arguments: --max_step 5 (did you mean --max_steps?)"


def test_items_of_the_wrong_length_are_one_line(tmp_path):
    """Items one token short and one token long in the training set, and one long in the
    validation set: each refused in one line naming the set, the class and both lengths. Checked
    against a planted bug: the check accepting items longer than --seq_len + 1 (`<` for `!=`)."""
    class Resized(Trainer):
        which, extra = 0, 0   # the set resized (0: training, 1: validation); tokens added or removed

        def _init_dataset(self):
            sets = list(super()._init_dataset())
            resize = (lambda x: x[:self.extra]) if self.extra < 0 else (lambda x: torch.cat([x, x[:self.extra]]))
            sets[self.which] = [resize(sets[self.which][i]) for i in range(len(sets[self.which]))]
            return sets
    for which, extra in ((0, -1), (0, 1), (1, 1)):
        Resized.which, Resized.extra = which, extra
        name = ("training", "validation")[which]
        with pytest.raises(ConfigError, match=rf"^item 0 of the {name} set \(list\) has {17 + extra} tokens; each "
                           r"item must hold --seq_len \+ 1 = 17 \(inputs and next-token targets\)$"):
            Resized(tiny_config(tmp_path))


def test_token_ids_past_vocab_size_are_one_line_before_the_first_step(tmp_path):
    """Ids >= --vocab_size (64 here) in a checked item (the first, middle and last of each set), or
    anywhere in a token cache that records its largest id (index.json's max_token_id, as
    tokenize.py writes it): a one-line ConfigError naming --vocab_size as the Trainer is built, and
    no run folder."""
    class Past(Trainer):
        def _init_dataset(self):
            train, val = super()._init_dataset()
            items = [train[i] for i in range(len(train))]
            items[128] = torch.full_like(items[128], 64)
            return items, val
    with pytest.raises(ConfigError, match=r"^item 128 of the training set \(list\) holds token id 64, not below "
                       r"--vocab_size 64$"):
        Past(tiny_config(tmp_path))

    cache = tmp_path / "cache"
    cache.mkdir()
    tokens = np.arange(2000, dtype=np.uint16) % 60
    tokens[500] = 64   # in training window 31, not one of the checked 0, 56 and 111
    tokens.tofile(cache / TOKENS_FILE)
    (cache / INDEX_FILE).write_text(json.dumps({
        "num_tokens": 2000, "dtype": "uint16", "vocab_size": 65, "max_token_id": 64, "eos_token_id": 0,
        "tokenizer": "words", "splits": {"train": [0, 1800], "val": [1800, 2000]}}))

    class Cached(Trainer):
        def _init_dataset(self):
            return TokenWindowDataset(cache, 16, "train"), TokenWindowDataset(cache, 16, "val")
    with pytest.raises(ConfigError, match=r"^the training set \(TokenWindowDataset\) holds token ids up to 64 \(its "
                       r"token cache's max_token_id\), not below --vocab_size 64$"):
        Cached(tiny_config(tmp_path))
    assert os.listdir(tmp_path) == ["cache"]


def test_custom_data_is_part_of_the_run_identity(tmp_path):
    """docs/extending.md's custom-data Trainer, saved and run as a user runs it (python my_pretrain.py,
    same flags; forked with torch imported, tests/dist_helper.py:run_script) on a my_tokens.pt:
    other tokens start a run folder of their own (trains, exit 0) instead of resuming the finished
    one; the same tokens again find their finished run (one line, exit 2)."""
    (tmp_path / "my_pretrain.py").write_text(doc_block("docs/extending.md", "trainer"))
    flags = [f for f in TINY_FLAGS if f != "--use_mock_data"] + ["--log_dir", str(tmp_path / "logs")]

    def train_on(seed_or_tokens):
        tokens = seed_or_tokens if isinstance(seed_or_tokens, torch.Tensor) else \
            torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(seed_or_tokens))
        torch.save(tokens, tmp_path / "my_tokens.pt")
        return run_script("my_pretrain.py", *flags, cwd=tmp_path)
    first = train_on(0)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_a,) = os.listdir(tmp_path / "logs")
    assert "data: Windows, 309 training / 3 validation sequences (identity " in first.stdout
    other = train_on(1)
    assert other.returncode == 0, other.stderr[-2000:]
    (run_b,) = set(os.listdir(tmp_path / "logs")) - {run_a}
    assert sorted(read_log(tmp_path / "logs" / run_b)) == list(range(8))
    again = train_on(0)
    assert again.returncode == 2
    assert again.stderr.strip().startswith(f"[tinytron] error: {tmp_path / 'logs' / run_a} is complete at step 8 of 8")

    # Ids past --vocab_size only where the checks before the first step do not look (not in the
    # first, middle or last item of a set): the first batch ends the run, in one line, exit 2, and
    # the run folder it had made is gone.
    valid = torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(2))
    past = torch.full((5000,), 64)
    for start, end in ((0, 17), (154 * 16, 154 * 16 + 17), (308 * 16, 308 * 16 + 17), (4950, 5000)):
        past[start:end] = valid[start:end]   # the checked windows: 0, 154, 308 of 309; all 3 of validation
    r = train_on(past)
    lines = [line for line in re.split(r"[\r\n]", r.stderr) if line.strip() and not re.match(r"\s*\d+%\|", line)]
    assert (r.returncode, lines) == (2, ["[tinytron] error: a batch of step 0 holds token id 64, not below "
                                         "--vocab_size 64"]), r.stderr
    assert sorted(os.listdir(tmp_path / "logs")) == sorted([run_a, run_b])


def test_each_sampled_item_of_custom_data_is_in_the_run_identity(tmp_path):
    """A Trainer with its own data (lists of 41 training / 9 validation windows): the same data
    (new, equal tensors) finds the same run folder; one token changed in the first, middle or last
    item (0, n // 2, n - 1) of either set gives a folder of its own, each a different one. Checked
    against planted bugs: the middle item not hashed (`{0, n - 1}`), the validation set not hashed."""
    def windows(n, seed):
        return [w for w in torch.randint(0, 64, (n, 17), generator=torch.Generator().manual_seed(seed))]

    class Custom(Trainer):
        change = None   # (set: 0 training / 1 validation, item index) whose first token is changed

        def _init_dataset(self):
            sets = [windows(41, 0), windows(9, 1)]
            if self.change:
                which, i = self.change
                sets[which][i] = sets[which][i].clone()
                sets[which][i][0] = (sets[which][i][0] + 1) % 64
            return tuple(sets)
    folder = Custom(tiny_config(tmp_path, "--no-do_save")).run_dir
    assert Custom(tiny_config(tmp_path, "--no-do_save")).run_dir == folder
    changed = {}
    for which, n in ((0, 41), (1, 9)):
        for i in (0, n // 2, n - 1):
            Custom.change = (which, i)
            changed[which, i] = os.path.basename(Custom(tiny_config(tmp_path, "--no-do_save")).run_dir)
    assert len(set(changed.values()) - {os.path.basename(folder)}) == 6, (os.path.basename(folder), changed)


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
        assert p.returncode == 2 and err.strip() == "[tinytron] error: world size 2 is not divisible by --sep_size 3"
    # Under torchrun the job fails as a whole (torchrun stops the other rank once one has failed).
    r = _cli(*TINY_FLAGS, "--log_dir", str(tmp_path), "--sep_size", "3", nproc=2)
    assert r.returncode != 0 and "[tinytron] error: world size 2 is not divisible by --sep_size 3" in r.stderr
    assert "trainer.py" not in r.stderr  # no traceback from our code


def _error_lines(stderr: str) -> list[str]:
    """stderr without torchrun's OMP_NUM_THREADS notice (W... lines) and the launcher's python line."""
    return [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"W\d{4} ", line) and not line.startswith("[tinytron] python: ")]


def _unprefixed(r: subprocess.CompletedProcess) -> list[str]:
    """The lines of a run's console (stdout and stderr) without the project's prefix, other than
    torch's own log lines (W1207 12:00:00 ...) and the progress bar's redraws (split at \\r)."""
    return [line for text in (r.stdout, r.stderr) for line in re.split(r"[\r\n]", text)
            if line.strip() and not line.startswith("[tinytron] ") and not re.match(r"[WIE]\d{4} |\s*\d+%\|", line)]


RAISING_WORKER = """
from tinytron.training import Trainer, run


class Raising(Trainer):
    def _init_dataset(self):
        raise ValueError("test error in _init_dataset")


if __name__ == "__main__":
    run(Raising)
"""


def test_bad_input_under_tinytron_torchrun_is_one_line(tmp_path):
    """tinytron-torchrun (torchrun with the same flags) and the scripts (which run it): bad input
    the workers find is the one line, printed once, exit 2, with nothing from torchrun (no log of
    failed workers, no traceback): a typo, and through a script a --device the machine lacks (only
    workers find it: the preflight checks flags), also when torchrun restarts the workers.
    Any other failure, a worker that raises, keeps torchrun's exit 1 and its report (the worker's
    traceback and line, torchrun's table of failed workers). Checked against a planted bug:
    every failed job turned into exit 2 without torchrun's report."""
    tinytron_torchrun = [os.path.join(os.path.dirname(sys.executable), "tinytron-torchrun"), "--standalone"]
    typo = "[tinytron] error: unrecognized arguments: --max_step 5 (did you mean --max_steps?)"
    r = subprocess.run(["bash", "-c", doc_command("docs/parallelism.md", "torchrun", "--log_dir", str(tmp_path),
                                                  "--max_step", "5")],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=launch_env(os.path.dirname(sys.executable)))
    assert (r.returncode, _error_lines(r.stderr)) == (2, [typo]), r.stderr

    (tmp_path / "raising.py").write_text(RAISING_WORKER)
    r = subprocess.run([*tinytron_torchrun, "--nproc_per_node", "1", str(tmp_path / "raising.py"), *TINY_FLAGS,
                        "--log_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert ("ValueError: test error in _init_dataset\n"
            "[tinytron] error: rank 0: ValueError: test error in _init_dataset\n") in r.stderr, r.stderr
    assert re.search(r"ChildFailedError: \n=+\n\S*raising.py FAILED\n", r.stderr), r.stderr
    assert re.search(r"Root Cause \(first observed failure\):\n\[0\]:\n(.*\n)*  exitcode  : 1 \(pid", r.stderr), \
        r.stderr

    if not torch.cuda.is_available():   # README's real-data example, on a device the machine lacks
        r = subprocess.run(["bash", "-c", doc_command("README.md", "example", "--log_dir", str(tmp_path),
                                                      "--device", "cuda")],
                           cwd=REPO, capture_output=True, text=True, timeout=180,
                           env={**launch_env(), "MAX_RESTARTS": "1"})
        assert (r.returncode, _error_lines(r.stderr)) == (2, [
            "[tinytron] error: --device cuda but no CUDA device is available (--device auto picks CUDA when there "
            "is one, else the CPU)"]), r.stderr


def test_preflight_reports_bad_paths_before_any_worker(tmp_path, monkeypatch, capsys):
    """What scripts/launch.sh runs before torchrun (the entry point under TINYTRON_PREFLIGHT, in one
    process): a --resume_path that does not exist, a --log_dir under a file: one line, exit 2, and
    nothing created."""
    from tinytron.training import run
    monkeypatch.setenv("TINYTRON_PREFLIGHT", "2")
    (tmp_path / "afile").write_text("")
    missing, under_file = tmp_path / "logs" / "does_not_exist", tmp_path / "afile" / "logs"
    for flags, line in [(["--resume_path", str(missing)], f"--resume_path {missing} does not exist"),
                        (["--log_dir", str(under_file)], f"--log_dir {under_file} is not writable "
                                                         f"({tmp_path / 'afile'} is a file)")]:
        with pytest.raises(SystemExit) as e:
            run(argv=[*TINY_FLAGS, "--log_dir", str(tmp_path / "logs"), *flags])
        assert e.value.code == 2 and capsys.readouterr().err == f"[tinytron] error: {line}\n"
    assert os.listdir(tmp_path) == ["afile"]


def test_launcher_without_torch_is_one_line(tmp_path):
    """scripts/launch.sh (through scripts/debug_cpu/pretrain.sh) with TINYTRON_PYTHON naming a
    Python without torch (a fresh venv of this interpreter, no packages): one line naming it, exit
    2, before anything runs. Checked against a planted bug: the launcher's `import torch` check
    skipped (the user then gets the preflight's ModuleNotFoundError traceback, exit 1)."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    python = str(bare / "bin" / "python")
    r = subprocess.run(["bash", "scripts/debug_cpu/pretrain.sh", "--log_dir", str(tmp_path / "logs")], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={**launch_env(), "TINYTRON_PYTHON": python})
    assert (r.returncode, r.stderr.splitlines()) == (2, [
        "[tinytron] error: no Python with torch found (tried $TINYTRON_PYTHON, $VIRTUAL_ENV, .venv/bin/python, "
        f"python3 on PATH: {python} has no torch); install as README.md says or set TINYTRON_PYTHON"]), r.stderr
    assert not (tmp_path / "logs").exists()


def test_debug_cpu_script_runs(tmp_path):
    """README's quick start, shortened: torchrun, 2 processes, gloo, mock data; every line the
    project prints carries the [tinytron] prefix. The same command again finds the finished run:
    one line naming it, exit 2, no traceback (the launcher's preflight, before torchrun). Its
    advice, followed (--resume_path <run> and a larger --max_steps, here with docs/parallelism.md's
    sequence-parallel command; no MASTER_PORT: a free port), trains a new run folder from the run's
    last checkpoint and says so in the start block; that command, run again once finished (a
    finished run started with --resume_path), is again the preflight's one line."""
    logs = tmp_path / "logs"

    def script(command, **env):
        return subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=180,
                              env={**launch_env(), **env})

    def advice(run, step):
        return (f"[tinytron] error: {run} is complete at step {step} of {step}: to train it further, run with "
                f"--resume_path {run} and a --max_steps above {step}, which starts a new run folder from its last "
                "checkpoint; for a new run, another --exp_name or --log_dir")
    quickstart = doc_command("README.md", "quickstart", "--log_dir", str(logs), "--max_steps", "12")
    r = script(quickstart, MASTER_PORT=str(free_port()))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[tinytron] warning: --val_every_steps 20 > the run's 12 steps: validation runs once, at the end" in r.stdout
    (run_dir,) = [os.path.join(logs, d) for d in os.listdir(logs)]
    losses = read_log(run_dir)
    assert len(losses) == 12 and losses[11] < losses[0]
    # README shows the output of the full run: its lines have the shape of this run's (numbers aside).
    def shape(line):
        line = re.sub(r"_[0-9a-f]{8}\b", "_HASH", line.replace(str(logs), "logs"))
        return re.sub(r"\s+", " ", re.sub(r"\d[\d,.e+-]*", "N", line))
    shown = [line for line in doc_output("README.md", "quickstart").splitlines() if line != "..."]
    assert [line for line in shown if shape(line) not in set(map(shape, r.stdout.splitlines()))] == []
    again = script(quickstart, MASTER_PORT=str(free_port()))
    assert again.returncode == 2
    assert again.stderr.splitlines() == [f"[tinytron] python: {sys.executable}", advice(run_dir, 12)]
    followed = doc_command("docs/parallelism.md", "sep", "--log_dir", str(logs), "--max_steps", "14",
                           "--resume_path", run_dir)   # --max_steps is in the run's hash
    more = script(followed)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "world 2 = dp 1 x sep 2" in more.stdout
    (longer,) = [os.path.join(logs, d) for d in os.listdir(logs) if os.path.join(logs, d) != run_dir]
    assert sorted(read_log(longer)) == [12, 13]
    assert f"[tinytron] run folder: {longer} (new, from {run_dir}/checkpoints/step_00000012 at step 12)" \
        in more.stdout.splitlines()
    assert "[tinytron] resume: --max_steps 12 -> 14" in more.stdout.splitlines()
    assert _unprefixed(r) == [] and _unprefixed(more) == [], (_unprefixed(r), _unprefixed(more))
    finished = script(followed)
    assert (finished.returncode, finished.stderr.splitlines()) == (
        2, [f"[tinytron] python: {sys.executable}", advice(longer, 14)])


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
