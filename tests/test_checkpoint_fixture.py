"""A checkpoint written before the architecture refactor (tests/fixtures/checkpoint_v2, commit
5510c03: tiny MoE, world 2, --sep_size 2, ZeRO-1, sharded) still loads and resumes.

References are independent of Tinytron's reading code: the fixture's DCP files read with torch's
own `dcp_to_torch_save`, and the log.txt / metrics.jsonl of the run that wrote the fixture and
went on to step 8 without stopping. Tolerance: the same layout and the same code path give the
same fp32 arithmetic, so the resumed losses agree to rounding (~1e-7 across machines); 1e-5
relative (as in test_checkpoint.py) leaves a margin.
"""

import json
import os

import numpy as np
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.dist_helper import run_distributed
from tests.test_checkpoint import MOE
from tests.utils import read_log, tiny_config
from tinytron.training import Trainer
from tinytron.training.config import Config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoint_v2")
STEP4 = os.path.join(FIXTURE, "step_00000004")


def _read_dcp(folder: str, tmp_path) -> dict:
    out = os.path.join(tmp_path, os.path.basename(folder) + ".pt")
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def test_fixture_config_keeps_its_run_folder():
    """The same command must find the same run folder: the fixture's config hashes as it did."""
    meta = torch.load(os.path.join(STEP4, "meta.pt"), weights_only=True)
    assert Config.from_dict(meta["config"]).short_hash() == "a57e6b0f"


def test_fixture_loads_bit_for_bit(tmp_path):
    """Loaded at world 1 by the Trainer (--resume_path), the model and the AdamW state equal the
    fixture's tensors as torch.distributed.checkpoint reads them, bit for bit."""
    trainer = Trainer(tiny_config(tmp_path, *MOE, "--resume_path", STEP4))
    assert trainer.step == 4
    want = _read_dcp(os.path.join(STEP4, "model"), tmp_path)
    got = trainer.model.state_dict()
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    saved = _read_dcp(os.path.join(STEP4, "optimizer"), tmp_path)
    state = trainer.optimizer.state_dict()["state"]
    assert sorted(state) == sorted(saved["shapes"])
    for name, values in state.items():
        assert torch.equal(values["step"], saved[f"param/{name}/step"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(values[key].flatten(), saved[f"elem/{name}/{key}"]), (name, key)


def _resume(log_dir: str) -> tuple[str, int]:
    trainer = Trainer(tiny_config(log_dir, *MOE, "--sep_size", "2", "--resume_path", STEP4))
    start = trainer.step
    trainer.train()
    return trainer.run_dir, start


def test_fixture_resumes_like_the_run_that_wrote_it(tmp_path):
    """Resumed on its own layout (world 2, sep 2), steps 4..7 have the losses and grad norms the
    writing run logged when it went on without stopping."""
    results = run_distributed(_resume, 2, str(tmp_path))
    assert [start for _, start in results] == [4, 4]
    run_dir = results[0][0]
    ref, got = read_log(FIXTURE), read_log(run_dir)
    assert sorted(got) == [4, 5, 6, 7]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-5)
    with open(os.path.join(FIXTURE, "metrics.jsonl")) as f:
        ref_norms = {r["step"]: r["train/grad_norm"] for r in map(json.loads, f)}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        norms = {r["step"]: r["train/grad_norm"] for r in map(json.loads, f) if r["step"] >= 4}
    assert sorted(norms) == [4, 5, 6, 7]
    np.testing.assert_allclose([norms[s] for s in norms], [ref_norms[s] for s in norms], rtol=1e-5)
