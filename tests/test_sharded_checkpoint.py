"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes only its own ZeRO-1 shard
of the optimizer state and a share of the model; a checkpoint resumes on another world size and
--sep_size; a checkpoint of the older format (full model.pt / optimizer.pt) still resumes.
Driven through the real Trainer (gloo, CPU, fp32, tiny MoE model: dense and expert tensors).

Tolerance: a resume on another layout only changes fp32 summation orders (gradient reductions,
attention over gathered heads, expert regrouping), ~1e-7 relative over 4 AdamW steps; 1e-5
relative (as in test_checkpoint.py) leaves a margin.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.dist_helper import run_distributed
from tests.test_checkpoint import MOE, ckpt_path, resume_and_train
from tests.utils import read_log, rel, tiny_config
from tinytron.distributed.sharded_checkpoint import read_metadata
from tinytron.distributed.zero1 import DistributedOptimizer
from tinytron.distributed.zero1.optimizer_state import read_state_dict
from tinytron.model import GPT
from tinytron.training import Trainer
from tinytron.training.checkpoint import CheckpointError, load_checkpoint, read_model_state
from tinytron.training.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(REPO, "tests", "fixtures", "legacy_checkpoint")
# Resumes of the world-2 / sep-1 checkpoint of step 4: (world size, sep size).
LAYOUTS = {"w4sep2": (4, 2), "w1": (1, 1)}


def grad_norms(run_dir: str) -> dict[int, float]:
    """{step: grad norm} of metrics.jsonl (full precision; the last record of a step wins)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/grad_norm"] for r in records if r.get("train/grad_norm") is not None}


def _train_world2(base: str) -> None:
    """World 2, sep 1 (experts sharded over the DP group of 2), 8 steps saving at 4 and 8; then a
    copy of the run per layout of LAYOUTS, without its step-8 checkpoint."""
    run_dir, _ = resume_and_train(f"{base}/ref", *MOE, "--sep_size", "1")
    if dist.get_rank() == 0:
        for layout in LAYOUTS:
            copy = f"{base}/{layout}/{os.path.basename(run_dir)}"
            shutil.copytree(run_dir, copy)
            shutil.rmtree(ckpt_path(copy, 8))


def _resume(base: str, layout: str, sep: int) -> int:
    return resume_and_train(f"{base}/{layout}", *MOE, "--sep_size", str(sep))[1]


def test_each_rank_writes_its_shard_and_resumes_on_other_layouts(tmp_path):
    """The world-2 / sep-1 checkpoint: every optimizer state tensor is split between the two
    ranks' files in halves (no rank wrote the gathered state), every model tensor is written once
    and both ranks wrote some. Resumed at world 4 / sep 2 (experts resharded over EP 2 x DP 2)
    and at world 1 by the same command: steps 4..7 have the losses and grad norms of the
    uninterrupted world-2 run, and the step-8 weights and optimizer state equal its, within 1e-5
    relative."""
    base = str(tmp_path)
    run_distributed(_train_world2, 2, base)
    ref_dir = tiny_config(f"{base}/ref", *MOE).run_dir

    # Who wrote what, from the DCP metadata of the step-4 checkpoint.
    for part in ("optimizer", "model"):
        md = read_metadata(os.path.join(ckpt_path(ref_dir, 4), part))
        per_rank = {}   # file -> {key: elements written}
        for index, info in md.storage_data.items():
            saved = md.state_dict_metadata[index.fqn]
            if isinstance(saved, TensorStorageMetadata):
                chunk = next(c for c in saved.chunks if c.offsets == index.offset)
                per_rank.setdefault(info.relative_path, {})[index.fqn] = chunk.sizes.numel()
        assert sorted(per_rank) == ["__0_0.distcp", "__1_0.distcp"], part
        if part == "optimizer":   # each rank holds half of each (dense, expert) flat buffer
            total = sum(m.size.numel() for k, m in md.state_dict_metadata.items() if k.startswith("elem/"))
            for files in per_rank.values():
                written = sum(n for k, n in files.items() if k.startswith("elem/"))
                assert abs(written - total / 2) <= 2 * 2 * 2, (written, total)   # padding: < 2 per buffer and key
        else:
            written = [key for files in per_rank.values() for key in files]
            assert sorted(written) == sorted(md.state_dict_metadata)   # each tensor exactly once

    for (world, sep), layout in zip(LAYOUTS.values(), LAYOUTS):
        if world == 1:
            starts = [_resume(base, layout, sep)]
        else:
            starts = run_distributed(_resume, world, base, layout, sep)
        assert starts == [4] * world
        run_dir = tiny_config(f"{base}/{layout}", *MOE).run_dir
        ref, got = read_log(ref_dir), read_log(run_dir)
        assert sorted(got) == sorted(ref)
        np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-5, err_msg=layout)
        ref_norms, norms = grad_norms(ref_dir), grad_norms(run_dir)
        assert sorted(norms) == list(range(8))
        np.testing.assert_allclose([norms[s] for s in range(4, 8)], [ref_norms[s] for s in range(4, 8)],
                                   rtol=1e-5, err_msg=layout)
        want, have = read_model_state(ckpt_path(ref_dir, 8)), read_model_state(ckpt_path(run_dir, 8))
        assert want.keys() == have.keys()
        for name in want:
            assert rel(have[name], want[name]) <= 1e-5, (layout, name)
        want = read_state_dict(os.path.join(ckpt_path(ref_dir, 8), "optimizer"))
        have = read_state_dict(os.path.join(ckpt_path(run_dir, 8), "optimizer"))
        assert have["param_groups"] == want["param_groups"]
        assert have["state"].keys() == want["state"].keys()
        for name, state in want["state"].items():
            assert torch.equal(have["state"][name]["step"], state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert rel(have["state"][name][key], state[key]) <= 1e-5, (layout, name, key)


def test_checkpoint_of_the_older_format_resumes(tmp_path):
    """tests/fixtures/legacy_checkpoint: step 4 of the tiny dense run (world 2, ZeRO-1) written
    by Tinytron before sharded checkpoints (model.pt, optimizer/optimizer.pt). Loaded in one
    process, the model and the AdamW state equal the fixture's files bit for bit (read with plain
    torch.load: the independent reference). Resumed at world 1 through --resume_path, the run
    continues at step 4 and writes sharded checkpoints. (Its old log.txt is not compared: that run
    drew its batches from the sampler before the Feistel order, so later losses differ by design.)
    Loading one of the new checkpoints into a model of another shape (no config given to compare
    first) is a one-line CheckpointError."""
    legacy = os.path.join(LEGACY, "step_00000004")
    cfg = tiny_config(tmp_path)
    model = GPT(cfg.model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    zero = DistributedOptimizer(torch.optim.AdamW([{"params": decay}, {"params": rest}]), model)
    assert load_checkpoint(legacy, model, zero)["step"] == 4
    want = torch.load(os.path.join(legacy, "model.pt"), weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
    want = torch.load(os.path.join(legacy, "optimizer", "optimizer.pt"), weights_only=True)["state"]
    got = zero.state_dict()["state"]
    assert sorted(got) == sorted(want)
    for name in want:
        for key, value in want[name].items():
            assert torch.equal(got[name][key], value), (name, key)

    run_dir, start = resume_and_train(tmp_path, "--resume_path", legacy)
    assert start == 4
    assert sorted(read_log(run_dir)) == [4, 5, 6, 7]
    assert sorted(os.listdir(ckpt_path(run_dir, 8))) == ["COMPLETE", "meta.pt", "model", "optimizer", "rng"]

    other = GPT(dataclasses.replace(tiny_config(tmp_path).model, hidden_size=48))
    zero = DistributedOptimizer(torch.optim.AdamW(other.parameters()), other)
    with pytest.raises(CheckpointError, match=r"another shape: embed.weight is \(64, 32\) there, \(64, 48\) here"):
        load_checkpoint(ckpt_path(run_dir, 8), other, zero)


def _resume_legacy_with_fsdp(log_dir: str) -> str:
    try:
        Trainer(tiny_config(log_dir, "--fsdp", "--resume_path", os.path.join(LEGACY, "step_00000004")))
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_checkpoint_of_the_older_format_with_fsdp_is_a_one_line_error(tmp_path):
    """The older gathered files cannot be read into FSDP2's shards: every rank says so in one line
    (resuming once without --fsdp converts the run)."""
    for message in run_distributed(_resume_legacy_with_fsdp, 2, str(tmp_path)):
        assert message.endswith("which loads without --fsdp only: resume it once without --fsdp, then go on "
                                "with --fsdp") and "\n" not in message, message


def test_a_config_of_the_older_version_keeps_its_run_folder():
    """The same command must find the same run folder after an upgrade: flags added since
    (e.g. --val_max_tokens) enter the hash only when set. 8ea409e4 is the folder hash that
    commit f8fdcd6 gave the fixture's run (tests/fixtures/legacy_checkpoint/README.md)."""
    meta = torch.load(os.path.join(LEGACY, "step_00000004", "meta.pt"), weights_only=True)
    cfg = Config.from_dict(meta["config"])
    assert cfg.short_hash() == "8ea409e4"
    capped = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, val_max_tokens=4096))
    assert capped.short_hash() != cfg.short_hash()
