"""Downstream accuracy: multiple-choice tasks (tinytron/data/multiple_choice.py) scored as
lm-evaluation-harness scores them, in the Trainer (--eval_tasks, every --eval_every_steps and at the
end) and by tinytron-eval.

For each item and each ending e, the log-likelihood of the continuation " " + e given the context
(the tokens of data/multiple_choice.encode_request; sequences longer than the model's block_size
+ 1 tokens keep their last block_size + 1, lm-eval's left truncation with max_length = block_size,
the exported config's max_position_embeddings). Then, per item, as lm-eval's multiple_choice:

    acc      = [argmax_e  loglik(e)            == label]
    acc_norm = [argmax_e  loglik(e) / len(e)   == label]     len(e): characters of the ending

(ties go to the first ending, np.argmax), averaged over the items.

Layout: the items of all tasks, in order, are split over the data-parallel ranks (item k to DP rank
k % dp_size); every rank of a SEP group scores the same sequences, each its sequence chunk
(`sequence_chunk`; sequences padded to a multiple of sep_size), so any layout of the Trainer
(dp, Ulysses, experts over SEP) works. Each rank fills its items' log-likelihoods (its chunk's
share under SEP) into one vector over ALL items' endings, zeros elsewhere; ONE all-reduce (SUM over
the world, carrying the stop-signal flags too) and one host sync at the end give every rank every
log-likelihood, from which the accuracies are computed on the host.
"""

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tinytron.data.multiple_choice import Item, encode_request, read_tasks
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.sequence_parallel import sequence_chunk
from tinytron.distributed.signals import StopSignals
from tinytron.model.gpt import IGNORE_INDEX
from tinytron.training.config import Config, ConfigError
from tinytron.training.sync import agree_on_stop, stop_flags


@dataclass(frozen=True)
class TaskScore:
    acc: float                                  # fraction of items whose best summed log-likelihood is the label
    acc_norm: float                             # the same with log-likelihood / characters of the ending
    items: int
    loglikelihoods: list[list[float]]           # [item][ending], summed over the continuation's tokens


def _pad_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class DownstreamEval:
    """Tokenizes this DP rank's items once, into batches; `evaluate(model)` scores them.

    tasks: {name: items} (read_tasks); tokenizer: a transformers tokenizer; max_len: the model's
    block_size (longest input); max_tokens: padded tokens per forward (rows x length; at least one
    row); vocab_size: token ids must be below it; equal_forwards: every rank runs as many forwards
    (the model's forwards are collective over the world, as with --fsdp: the DP ranks' items differ
    in number and length). Raises ValueError (one line) for an item that cannot be scored. Takes DP
    rank/size and SEP size from parallel_state: build it after init_runtime."""

    def __init__(self, tasks: dict[str, list[Item]], tokenizer, max_len: int, max_tokens: int, vocab_size: int,
                 equal_forwards: bool = False):
        self.tasks, self.equal_forwards = tasks, equal_forwards
        items = [item for task in tasks.values() for item in task]
        self.offsets = np.cumsum([0] + [len(item.endings) for item in items])  # item k's endings start here
        sep, dp_rank, dp_size = ps.get_sep_size(), ps.get_dp_rank(), ps.get_dp_size()
        pairs = []  # (input tokens, targets, index into the log-likelihood vector)
        cut = 0   # requests cut from the left (as lm-eval does, and warns)
        for k in range(dp_rank, len(items), dp_size):
            for j, ending in enumerate(items[k].endings):
                ctx, cont = encode_request(tokenizer, items[k].context, ending)
                if len(cont) > max_len:
                    raise ValueError(f"an ending of {len(cont)} tokens is longer than the model's block_size {max_len}")
                cut += len(ctx) + len(cont) > max_len + 1
                seq = (ctx + cont)[-(max_len + 1):]
                if max(seq) >= vocab_size:
                    raise ValueError(f"the tokenizer gives token id {max(seq)}, not below --vocab_size {vocab_size}")
                targets = [IGNORE_INDEX] * (len(seq) - 1 - len(cont)) + cont
                pairs.append((seq[:-1], targets, int(self.offsets[k]) + j))
        if cut:
            warnings.warn(f"{cut} of this rank's {len(pairs)} scored sequences are longer than block_size + 1 = "
                          f"{max_len + 1} tokens: their contexts are cut from the left", stacklevel=2)
        # Longest first (lm-eval's order): each batch is padded to its first sequence's length.
        pairs.sort(key=lambda p: (-len(p[0]), p[2]))
        self.batches = []  # (inputs [rows, length], targets [rows, length], vector index [rows]) on CPU
        start = 0
        while start < len(pairs):
            length = _pad_up(len(pairs[start][0]), sep)
            rows = pairs[start:start + max(1, max_tokens // length)]
            start += len(rows)
            inputs = torch.zeros(len(rows), length, dtype=torch.long)
            targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
            for r, (inp, tgt, _) in enumerate(rows):
                inputs[r, :len(inp)], targets[r, :len(tgt)] = torch.tensor(inp), torch.tensor(tgt)
            self.batches.append((inputs, targets, torch.tensor([p[2] for p in rows])))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast=None, signals: StopSignals | None = None
                 ) -> dict[str, TaskScore]:
        """Score every task (collective over the world: call it on every rank). autocast: a
        context manager factory for the forward (None: the parameters' dtype). The model's
        parameters must be complete (ZeRO-1: after finish_param_gather); its train/eval mode is
        restored. signals: the stop signals received meanwhile are shared in the same all-reduce."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        logliks = torch.zeros(int(self.offsets[-1]), dtype=torch.float64, device=device)
        for inputs, targets, index in self._batches_to_run(device):
            inputs, targets, positions = sequence_chunk(inputs.to(device, non_blocking=True),
                                                        targets.to(device, non_blocking=True),
                                                        ps.get_sep_rank(), ps.get_sep_size())
            with (autocast or nullcontext)():
                logits = model(inputs, position_ids=positions)
            token_ll = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                        ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
            logliks.index_add_(0, index.to(device), token_ll.view(targets.shape).sum(1).double())
        model.train(was_training)
        flags = stop_flags(signals, device).double() if signals is not None else logliks[:0]
        totals = torch.cat((logliks, flags))
        if dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals.cpu().numpy()  # the evaluation's one host sync
        if signals is not None:
            agree_on_stop(signals, totals[len(logliks):].tolist())
        return self._scores(totals[:len(logliks)])

    def _batches_to_run(self, device: torch.device) -> list:
        """This rank's batches; with equal_forwards, padded to the most any rank has with batches
        that score nothing (one row of ignored targets, added to slot 0)."""
        if not (self.equal_forwards and dist.is_initialized()):
            return self.batches
        count = torch.tensor([len(self.batches)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        sep = ps.get_sep_size()
        empty = (torch.zeros(1, sep, dtype=torch.long), torch.full((1, sep), IGNORE_INDEX),
                 torch.zeros(1, dtype=torch.long))
        return self.batches + [empty] * (int(count.item()) - len(self.batches))

    def _scores(self, logliks: np.ndarray) -> dict[str, TaskScore]:
        """Per task: lm-eval's acc and acc_norm from every ending's log-likelihood (float64)."""
        scores, k = {}, 0
        for name, items in self.tasks.items():
            acc = acc_norm = 0
            per_item = []
            for item in items:
                lls = logliks[self.offsets[k]:self.offsets[k + 1]]
                chars = np.array([float(len(e)) for e in item.endings])
                acc += int(np.argmax(lls) == item.label)
                acc_norm += int(np.argmax(lls / chars) == item.label)
                per_item.append(lls.tolist())
                k += 1
            scores[name] = TaskScore(acc / len(items), acc_norm / len(items), len(items), per_item)
        return scores


def downstream_from_config(cfg: Config, equal_forwards: bool) -> DownstreamEval | None:
    """The Trainer's DownstreamEval for --eval_tasks (None without), tokenized with --tokenizer,
    at most --batch_size x --seq_len tokens per forward (equal_forwards: see DownstreamEval).
    ConfigError for a bad task file or tokenizer."""
    if not cfg.training.eval_tasks:
        return None
    from tinytron.data.tokenize import load_tokenizer
    t = cfg.training
    try:
        return DownstreamEval(read_tasks(t.eval_tasks), load_tokenizer(cfg.data.tokenizer), cfg.model.block_size,
                              t.batch_size * t.seq_len, cfg.model.vocab_size, equal_forwards)
    except ValueError as e:
        raise ConfigError(f"--eval_tasks: {e}") from None
