"""Training parity across parallel layouts (gloo, CPU, fp32): the same global batches give the same
losses whatever the split into data, sequence and expert parallelism.

Tolerances: the layouts compute the same fp32 math and differ only in summation order (gradient
reductions, attention over gathered heads, expert regrouping); over 10 AdamW steps losses, aux
losses and grad norms stay below 5e-7 relative (measured), dense and MoE, so 1e-5 everywhere.
Grad norms are compared too: AdamW hides a wrong gradient scale from the losses, not from them.
"""

import numpy as np

from tests.dist_helper import run_distributed
from tests.utils import tiny_config
from tinytron.training import Trainer

DENSE = ["--max_steps", "10", "--no-do_save", "--val_every_steps", "5"]
MOE = DENSE + ["--use_moe", "--num_experts", "4", "--num_experts_per_tok", "2",
               "--moe_intermediate_size", "32", "--moe_aux_loss_coeff", "0.05", "--moe_z_loss_coeff", "0.01"]


class RecordingTrainer(Trainer):
    """Keeps every step's reduced statistics (loss, aux loss, grad norm) and val losses."""

    def train_step(self, batches):
        stats = super().train_step(batches)
        self.history.append((stats["loss"], stats["aux_loss"], stats["grad_norm"]))
        return stats

    def evaluate(self):
        loss = super().evaluate()
        self.val_history.append(loss)
        return loss


def run_layouts(log_dir, base_flags, layouts):
    """Train once per layout (flags list) in this world; return [(history, val_history)]."""
    out = []
    for i, flags in enumerate(layouts):
        trainer = RecordingTrainer(tiny_config(f"{log_dir}/{i}", *base_flags, *flags))
        trainer.history, trainer.val_history = [], []
        trainer.train()
        out.append((np.array(trainer.history), np.array(trainer.val_history)))
    return out


def assert_same(got, ref, rtol):
    np.testing.assert_allclose(got[0], ref[0], rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(got[1], ref[1], rtol=rtol)


def test_sequence_parallel_training_parity(tmp_path):
    """world 1 vs world 2 (dp 2) vs world 2 (sep 2), ZeRO-1 on and off; GQA 4 heads / 2 kv."""
    (ref,) = run_layouts(tmp_path / "w1", DENSE, [[]])
    layouts = [["--sep_size", "1"], ["--sep_size", "2"], ["--sep_size", "2", "--no-use_distributed_optimizer"]]
    results = run_distributed(run_layouts, 2, str(tmp_path / "w2"), DENSE, layouts)
    for got in results[0]:
        assert len(got[0]) == 10 and len(got[1]) == 2
        assert_same(got, ref, rtol=1e-5)
    assert ref[0][-1, 0] < ref[0][0, 0]  # it trained


def test_sequence_parallel_with_one_kv_head(tmp_path):
    """sep 2 with a single kv head (kv heads replicated up to sep, not up to all query heads)."""
    flags = DENSE + ["--num_key_value_heads", "1"]
    (ref,) = run_layouts(tmp_path / "w1", flags, [[]])
    (got,) = run_distributed(run_layouts, 2, str(tmp_path / "w2"), flags, [["--sep_size", "2"]])[0]
    assert_same(got, ref, rtol=1e-5)


def test_moe_training_parity(tmp_path):
    """Tiny MoE (4 experts, top-2, aux and z losses): world 1 vs world 2 with sep 1 (experts
    replicated, dp 2) and sep 2 (experts split over 2 ranks, Ulysses attention). Losses, aux
    losses and grad norms of 10 steps agree within 1e-5 relative."""
    (ref,) = run_layouts(tmp_path / "w1", MOE, [[]])
    results = run_distributed(run_layouts, 2, str(tmp_path / "w2"), MOE,
                              [["--sep_size", "1"], ["--sep_size", "2"]])
    for got in results[0]:
        assert_same(got, ref, rtol=1e-5)
    assert (ref[0][:, 1] > 0).all()  # the aux loss is really there


def test_data_and_sequence_parallel_together(tmp_path):
    """World 4 = dp 2 x sep 2: both ranks non-zero, expert gradients reduced over a real DP
    subgroup; dense and MoE (ZeRO-1 on; MoE also off) against world 1."""
    (dense_ref,) = run_layouts(tmp_path / "d1", DENSE, [[]])
    (moe_ref,) = run_layouts(tmp_path / "m1", MOE, [[]])
    flags = ["--sep_size", "2"]
    results = run_distributed(_dense_and_moe_layouts, 4, str(tmp_path / "w4"), flags)
    dense, moe, moe_no_zero = results[0]
    assert_same(dense, dense_ref, rtol=1e-5)
    assert_same(moe, moe_ref, rtol=1e-5)
    assert_same(moe_no_zero, moe_ref, rtol=1e-5)


def _dense_and_moe_layouts(log_dir, flags):
    return (run_layouts(f"{log_dir}/d", DENSE, [flags])
            + run_layouts(f"{log_dir}/m", MOE, [flags, flags + ["--no-use_distributed_optimizer"]]))
