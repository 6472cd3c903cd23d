"""Communication overlapped with compute (DistributedOptimizer's overlap_grad_reduce and
overlap_param_gather, the Trainer's --overlap_grad_reduce / --overlap_param_gather, both on by
default): the grad reductions really start inside the last micro-step's backward and the param
all-gathers are waited for inside the next forward, and overlap on and off give bitwise the same
losses, grad norms and weights (the same collectives on the same buffers, only launched earlier).
A Trainer whose grad reductions overlap is freed once dropped, its model and optimizer with it."""

import gc
import weakref

import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed
from tests.test_parallel_training import RecordingTrainer
from tests.test_zero1 import TINY_BUCKET_MB, global_params, local_model, make_optimizer, micro_loss, set_lr, wrap
from tests.utils import tiny_config
from tinytron.distributed.parallel_state import initialize_parallel_state

# What gloo runs: reduce-scatter is an all-to-all (see grad_buffer.reduce_scatter); the all-gather is
# all_gather_single from torch 2.13, all_gather_into_tensor before (grad_buffer.all_gather).
REDUCE = "all_to_all_single"
GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class _RecordedWork:
    def __init__(self, work, name, events):
        self.work, self.name, self.events = work, name, events

    def wait(self):
        self.events.append(("wait", self.name))
        self.work.wait()


def record_events(overlap: bool) -> list[tuple]:
    """World 2 (dp 2), ZeRO-1, tiny buckets, 2 micro-steps, 2 optimizer steps of the toy model of
    test_zero1, with every collective launch ("launch", op, numel), wait ("wait", op) and the
    trainer-loop's phases recorded in order."""
    state = initialize_parallel_state(1)
    model = local_model(global_params(), 0, 1)
    zero = wrap(model, make_optimizer(model), state, True, TINY_BUCKET_MB, overlap)
    events, real = [], {name: getattr(dist, name) for name in (REDUCE, GATHER)}

    def recording(name):
        def launch(*args, **kwargs):
            work = real[name](*args, **kwargs)
            events.append(("launch", name, args[1].numel()))
            return _RecordedWork(work, name, events) if work is not None else None
        return launch

    for name in real:
        setattr(dist, name, recording(name))
    try:
        for step in range(2):
            set_lr(zero.param_groups, step)
            zero.zero_grad()
            for micro in range(2):
                events.append(("forward", step, micro))
                loss = micro_loss(model, step, micro, 2, state.dp_rank, state.dp_size)
                with zero.micro_step(last=micro == 1):
                    events.append(("backward", step, micro))
                    loss.backward()
                    events.append(("backward returned", step, micro))
            events.append(("reduce_gradients", step))
            zero.reduce_gradients()
            zero.step()
            events.append(("stepped", step))
        zero.finish_param_gather()
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return events


def between(events: list, start: tuple, end: tuple) -> list:
    return events[events.index(start) + 1:events.index(end)]


def test_reductions_launch_during_last_backward_and_gathers_wait_in_forward(tmp_path):
    runs = {overlap: run_distributed(record_events, 2, overlap)[0] for overlap in (True, False)}
    launches = {o: [e for e in ev if e[0] == "launch"] for o, ev in runs.items()}
    assert launches[True] == launches[False]   # the same collectives, on the same buffer sizes
    for overlap, events in runs.items():
        for step in range(2):
            # The first micro-step launches nothing; the last one launches inside its backward.
            assert not [e for e in between(events, ("backward", step, 0),
                                           ("backward returned", step, 0)) if e[0] == "launch"]
            in_backward = [e for e in between(events, ("backward", step, 1),
                                              ("backward returned", step, 1)) if e[0] == "launch"]
            reduces = [e for e in between(events, ("forward", step, 0), ("stepped", step))
                       if e[:2] == ("launch", REDUCE)]
            assert len(reduces) >= 3   # several buckets
            # `skip` gets no grad in the last micro-step: its bucket, and those after it in the
            # launch order, are launched when the backward returns.
            assert (len(in_backward) >= 1) if overlap else not in_backward, events
        # Step 0's all-gathers: launched in step(), waited for inside step 1's first forward.
        gathers = [e for e in between(events, ("reduce_gradients", 0), ("stepped", 0))
                   if e[:2] == ("launch", GATHER)]
        in_forward = between(events, ("forward", 1, 0), ("backward", 1, 0))
        assert len(gathers) >= 3
        assert in_forward.count(("wait", GATHER)) == (len(gathers) if overlap else 0), events


# ---- the Trainer: overlap on vs off, bitwise ---------------------------------------------------

BASE = ["--max_steps", "6", "--no-do_save", "--val_every_steps", "3"]
MOE = ["--use_moe", "--num_experts", "4", "--num_experts_per_tok", "2", "--moe_intermediate_size",
       "32", "--moe_aux_loss_coeff", "0.05"]
OFF = ["--no-overlap_grad_reduce", "--no-overlap_param_gather"]


class CollectivesInBackward:
    """Counts the collectives launched while a Tensor.backward() runs (gradient reductions, and
    the Ulysses / expert all-to-alls of the backward itself)."""

    def __enter__(self):
        self.count, self.inside = 0, False
        self.real = {name: getattr(dist, name) for name in ("all_to_all_single", "all_reduce")}
        self.real_backward = torch.Tensor.backward

        def launch(name):
            def wrapper(*args, **kwargs):
                self.count += self.inside
                return self.real[name](*args, **kwargs)
            return wrapper

        def backward(tensor, *args, **kwargs):
            self.inside = True
            try:
                return self.real_backward(tensor, *args, **kwargs)
            finally:
                self.inside = False

        for name in self.real:
            setattr(dist, name, launch(name))
        torch.Tensor.backward = backward
        return self

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)
        torch.Tensor.backward = self.real_backward


def train_runs(log_dir: str, layouts: list[list[str]]) -> list[dict]:
    """Train each layout with overlap on and off: per run, the step statistics (loss, aux loss,
    grad norm), val losses, final weights, the collectives launched inside backward() and whether
    the Trainer's model and optimizer were freed once it was dropped."""
    out = []
    for i, flags in enumerate(layouts):
        for overlap in (True, False):
            trainer = RecordingTrainer(tiny_config(f"{log_dir}/{i}{overlap}", *BASE, *flags,
                                                   *([] if overlap else OFF)))
            trainer.history, trainer.val_history = [], []
            with CollectivesInBackward() as counter:
                trainer.train()
            out.append(dict(history=trainer.history, val=trainer.val_history,
                            in_backward=counter.count,
                            weights={n: p.detach().clone()
                                     for n, p in trainer.model.named_parameters()}))
            kept = [weakref.ref(trainer.model), weakref.ref(trainer.optimizer)]
            del trainer
            gc.collect()
            out[-1]["kept"] = [ref() is not None for ref in kept]
    return out


def assert_pairs_bitwise(runs: list[dict]) -> None:
    for on, off in zip(runs[::2], runs[1::2]):
        assert len(on["history"]) == 6 and len(on["val"]) == 2
        assert on["history"] == off["history"] and on["val"] == off["val"]   # floats: bitwise
        for name, w in on["weights"].items():
            assert torch.equal(w, off["weights"][name]), name
        # The Trainer reduced grads inside its backward: at least one bucket in each of 6 steps.
        assert on["in_backward"] >= off["in_backward"] + 6, (on["in_backward"], off["in_backward"])
        # Its grad hooks (tensor hooks: references the garbage collector cannot see) did not keep
        # the model and optimizer alive. Checked against the hooks holding the optimizer's method
        # strongly: the optimizer was kept (and with it the params, grads and AdamW state), as
        # in benchmarks/async_save.py, whose successive 0.11B-parameter Trainers ran out of memory.
        assert on["kept"] == off["kept"] == [False, False], (on["kept"], off["kept"])


def test_trainer_overlap_is_bitwise_the_same(tmp_path):
    """World 2 (dense bf16 ZeRO-1 on and off, MoE at sep 2) and world 4 (MoE dp 2 x sep 2, ZeRO-1
    on and off); 2 to 4 micro-steps per optimizer step."""
    world2 = run_distributed(train_runs, 2, str(tmp_path / "w2"),
                             [["--precision", "bf16"], ["--no-use_distributed_optimizer"],
                              ["--sep_size", "2", *MOE]])
    world4 = run_distributed(train_runs, 4, str(tmp_path / "w4"),
                             [["--sep_size", "2", *MOE],
                              ["--sep_size", "2", *MOE, "--no-use_distributed_optimizer"]])
    for runs in world2 + world4:
        assert_pairs_bitwise(runs)
