"""--optimizer muon: torch.optim.Muon on the hidden weight matrices, AdamW on everything else, as in
the Muon post (Jordan et al., 2024) and Moonlight (Liu et al., arXiv 2502.16982).

Muon steps every matrix of the transformer blocks: the attention projections (the fused qkv_proj
is orthogonalised as one matrix, as the parameter it is; q, k, v apart would be a refinement),
the MLP projections (gate_up_proj likewise one matrix) and each MoE expert's
two matrices (an expert's [C, 2I] / [I, C] slice of the stacked weights, orthogonalised on its
own). AdamW steps the embedding, the output head, the RMSNorm weights and the MoE routers, with the
default recipe's hyper-parameters (--max_lr, --weight_decay on the head and routers, betas, eps).
The schedule (warmup + cosine) scales both: the Muon group's `lr_scale` is --muon_lr / --max_lr.

The learning-rate adjustment defaults to Moonlight's `match_rms_adamw` (update RMS matched to
AdamW's, lr x 0.2 sqrt(max(rows, cols))), so --muon_lr 0 (the default) reuses --max_lr, as
Moonlight does; `original` is the Muon post's sqrt(max(1, rows / cols)), with lr ~ 0.02. Weight
decay is decoupled, on the matrices. Under ZeRO-1 each matrix is owned by one rank
(distributed/zero1/whole_matrices.py); under --fsdp too, gathered whole from FSDP2's row shards
for the step and handed back (distributed/fsdp/muon.py).
"""

from collections import defaultdict

import torch

from tinytron.training.config import OptimConfig


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    """A hidden weight matrix (2-D, or stacked [E, m, n] experts) of a transformer block: not the
    embedding, the head (tied to the embedding or not), a norm or a router."""
    return (p.dim() >= 2 and name.startswith("layers.")
            and not any(part in name for part in ("embed", "lm_head", "router")))


class MuonWithAdamW:
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer: `param_groups` lists both
    optimizers' groups (the same dicts; AdamW's first), `state` is one dict shared by both, and
    load_state_dict() takes torch's format over all groups in that order (what DistributedOptimizer
    hands it; it saves `state` itself)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.optimizers = (adamw, muon)
        self._share_state()

    def _share_state(self) -> None:
        self.state = defaultdict(dict)
        for opt in self.optimizers:
            self.state.update(opt.state)
            opt.state = self.state

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def load_state_dict(self, state_dict: dict) -> None:
        """Each optimizer loads its groups (and the state of their params) in torch's format."""
        groups = state_dict["param_groups"]
        for opt in self.optimizers:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            ids = {i for g in mine for i in g["params"]}
            opt.load_state_dict({"param_groups": mine,
                                 "state": {i: v for i, v in state_dict["state"].items() if i in ids}})
        self._share_state()


def muon_optimizer(model: torch.nn.Module, o: OptimConfig, fused: bool) -> MuonWithAdamW:
    """Muon on `model`'s hidden matrices (a whole_matrices group), AdamW on the rest (weight decay
    on 2-D tensors that are not the embedding: the untied head and the routers)."""
    hidden, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if is_muon_param(name, p):
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=o.max_lr, betas=(o.beta1, o.beta2), eps=o.adam_eps, fused=fused)
    muon_lr = o.muon_lr or o.max_lr
    matrices = [p for p in hidden if p.dim() == 2]
    muon = torch.optim.Muon([{"params": matrices, "whole_matrices": True, "lr_scale": muon_lr / o.max_lr}],
                            lr=muon_lr, weight_decay=o.muon_weight_decay, momentum=o.muon_momentum,
                            nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps, adjust_lr_fn=o.muon_adjust_lr)
    stacked = [p for p in hidden if p.dim() == 3]
    if stacked:   # Muon's constructor takes 2-D tensors only; ZeRO-1 and FSDP hand it each expert's matrix
        muon.param_groups[0]["params"] += stacked
    return MuonWithAdamW(muon, adamw)
