"""DistributedOptimizer without torch.distributed (the wrapped optimizer, through views) and its
checks of bad input (world 2); the toy model and helpers of test_zero1.py."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.dist_helper import run_distributed
from tests.test_zero1 import global_params, local_model, make_optimizer, micro_loss, reference, train, wrap
from tinytron.distributed.parallel_state import initialize_parallel_state
from tinytron.distributed.zero1 import DistributedOptimizer

# ---- without torch.distributed -----------------------------------------------------------------

def test_no_process_group_is_the_wrapped_optimizer():
    want, _, _, _ = reference(3, accum=2, max_norm=0.0)
    model = local_model(global_params(), 0, 1)
    zero = wrap(model, make_optimizer(model), None)
    train(model, zero, None, range(3), accum=2, max_norm=0.0)
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name   # bitwise: nothing but views changed

    # model.zero_grad() (set_to_none by default) zeroes the grads in place: they stay views into
    # the flat grad buffer, of the model and of its submodules alike.
    micro_loss(model, 0, 0, 1).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad()
    model.inp.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        assert p.grad is grads[name] and not p.grad.any(), name
    # A grad taken out of the buffer some other way is caught before any reduction.
    model.gain.grad = None
    micro_loss(model, 0, 0, 1).backward()
    with pytest.raises(RuntimeError, match="flat grad buffer"):
        zero.reduce_gradients()


# ---- bad input ---------------------------------------------------------------------------------

def bad_input_errors() -> dict[str, str]:
    """Each bad input raises a ValueError matching its message; returns the messages."""
    rank = dist.get_rank()
    state = initialize_parallel_state(1)
    singletons = [dist.new_group([r]) for r in range(dist.get_world_size())]
    errors = {}

    def expect(label, match, build):
        with pytest.raises(ValueError, match=match) as info:
            build()
        errors[label] = str(info.value)

    def model_and_opt(extra=0):
        model = local_model(global_params(), 0, 1)
        if extra:
            model.extra = nn.Parameter(torch.zeros(extra))
        return model, make_optimizer(model)

    def unnamed():
        model, opt = model_and_opt()
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
        wrap(model, opt, state)
    expect("unnamed", "not among the named parameters", unnamed)

    def frozen():
        model, opt = model_and_opt()
        model.gain.requires_grad_(False)
        wrap(model, opt, state)
    expect("frozen", "gain has requires_grad=False", frozen)

    def not_member():
        model, opt = model_and_opt()
        DistributedOptimizer(opt, model, process_group=singletons[1 - rank])
    expect("not_member", "not a member of the process_group", not_member)

    def expert_outside():
        model, opt = model_and_opt()
        DistributedOptimizer(opt, model, process_group=singletons[rank],
                             expert_process_group=dist.group.WORLD)
    expect("expert_outside", "expert_process_group has ranks outside", expert_outside)

    def mismatch():   # rank 1's model has one more parameter
        model = local_model(global_params(), 0, 1)
        if rank == 1:
            model.extra = nn.Parameter(torch.zeros(3))
        opt = torch.optim.AdamW(model.parameters())
        wrap(model, opt, state)
    expect("mismatch", "ranks of process_group disagree", mismatch)

    def wrong_names():
        model, opt = model_and_opt()
        zero = wrap(model, opt, state)
        saved = zero.state_dict()
        saved["param_groups"][0]["params"] = ["inp.weight", "nonexistent"]
        zero.load_state_dict(saved)
    expect("wrong_names", "do not hold the same parameter names", wrong_names)

    def no_expert_parallel_group():   # dp 1 x sep 2: the two ranks hold different experts
        sep_state = initialize_parallel_state(2)
        model, opt = model_and_opt()
        zero = DistributedOptimizer(opt, model, process_group=dist.group.WORLD,
                                    expert_process_group=sep_state.dp_group)
        zero.state_dict()
    expect("no_expert_parallel_group", "needs the expert_parallel_group",
           no_expert_parallel_group)
    return errors


def test_bad_input_raises_one_line_value_error():
    for errors in run_distributed(bad_input_errors, 2):
        assert len(errors) == 7
        for label, message in errors.items():
            assert "\n" not in message, label
