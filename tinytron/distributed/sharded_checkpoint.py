"""Sharded checkpoint folders through torch.distributed.checkpoint (DCP): every rank writes and
reads only the tensors it holds; a tensor that several ranks hold (replicated) is written by one of
them (DCP spreads such tensors over the ranks by size).

A state is a flat dict {key: value}; a value is
    torch.Tensor   the whole tensor (the same on every rank that passes it);
    Chunk          this rank's block of a larger tensor: `tensor` sits at `offsets` inside a tensor
                   of shape `global_shape` (one ZeRO-1 piece of a flattened parameter's state, one
                   expert-parallel rank's experts); a block that several ranks pass (the experts
                   of the DP replicas) is written by one of them;
    [Chunk, ...]   several blocks of the same tensor (the Muon momenta of the experts a rank owns
                   under --fsdp, which need not be adjacent);
    anything else  a small picklable object (hyper-parameters), read back with weights_only=True.
A folder holds one DCP checkpoint: `.metadata` (the global shape, dtype and saved chunks of every
tensor; written by the coordinator) and `__<rank>_0.distcp` (what that rank wrote). On load, each
tensor or chunk is filled from the overlap of the saved chunks with it, so a state saved with one
sharding (world size, bucket size, expert-parallel size) loads into any other, and
`read_full_state` assembles whole tensors in one process without a process group.

Why Chunks and not DTensor: a ZeRO-1 piece is whatever flat range of a parameter falls into the
rank's shard of a bucket (any length, possibly none), which no DTensor placement describes; DCP's
planner API takes such chunks directly (two small planner subclasses below).
"""

import contextlib
import dataclasses
import io
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

METADATA_FILE = ".metadata"


@dataclasses.dataclass
class Chunk:
    """`tensor` is the block of a `global_shape` tensor that starts at `offsets` (one per dim)."""
    tensor: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]


class _ChunkSavePlanner(DefaultSavePlanner):
    """DCP's default planner (plain tensors and objects, deduplicated across ranks) plus Chunks,
    each written by the rank that passes it as a shard of its global tensor."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        plain = {k: v for k, v in self.state_dict.items() if not _chunks(v)}
        items = create_default_local_save_plan(plain, self.is_coordinator).items
        for key, value in self.state_dict.items():
            for c in _chunks(value):
                offsets = torch.Size(c.offsets)
                items.append(WriteItem(
                    index=MetadataIndex(key, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=c.tensor.size()),
                        properties=TensorProperties.create_from_tensor(c.tensor),
                        size=torch.Size(c.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        value = self.state_dict[index.fqn]
        return _chunk_at(value, index).tensor if _chunks(value) else super().lookup_object(index)


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Fills plain tensors (whole), Chunks (their block) and objects (replaced in the state dict,
    unpickled with weights_only=True) from the overlapping saved chunks."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        # The default also walks the state to materialise meta tensors, replacing any value of a
        # type it does not know (a Chunk) by None; the state here holds real tensors only.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata
        plain = {k: v for k, v in self.state_dict.items() if not _chunks(v)}
        items = create_default_local_load_plan(plain, self.metadata, strict=True).items
        for key, value in self.state_dict.items():
            for c in _chunks(value):
                md = saved.get(key)
                if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(c.global_shape):
                    raise ValueError(f"{key}: the checkpoint holds {getattr(md, 'size', 'no tensor')}, "
                                     f"expected a tensor of shape {tuple(c.global_shape)}")
            if _chunks(value):
                items += create_read_items_for_chunk_list(key, md, [
                    ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=c.tensor.size()) for c in _chunks(value)])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        value = self.state_dict[index.fqn]
        return _chunk_at(value, index).tensor if _chunks(value) else super().lookup_tensor(index)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def _chunks(value) -> list[Chunk]:
    """The Chunks of a state value (a Chunk or a list of them); [] for any other value."""
    if isinstance(value, Chunk):
        return [value]
    return value if isinstance(value, list) and value and all(isinstance(c, Chunk) for c in value) else []


def _chunk_at(value, index: MetadataIndex) -> Chunk:
    """The Chunk of `value` that starts at index.offset (DCP names a block by its offsets)."""
    return next(c for c in _chunks(value) if torch.Size(c.offsets) == index.offset)


def _no_dist(group) -> bool:
    return group is None or not dist.is_initialized() or dist.get_world_size(group) == 1


@contextlib.contextmanager
def _dcp_call():
    """Silence DCP's warning that a call without a process group is single-process (it is meant
    to be), and raise a failure as the failing rank's own exception: DCP hands a failure on any
    rank to every rank as one CheckpointException, a BaseException that `except Exception`
    misses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            raise e.failures[min(e.failures)][0] from e


def save_state(directory: str, state: dict, group=None) -> list[str]:
    """Write `state` (see the module docstring) to `directory`. Collective over `group` (None or a
    group of size 1: this process alone). Files are fsynced before it returns. Returns the paths
    of the files this rank wrote."""
    with _dcp_call():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory),
                 planner=_ChunkSavePlanner(), process_group=group, no_dist=_no_dist(group))
    # Read from the folder, not from the Metadata dcp.save returns: whether that carries the
    # storage map differs between torch releases (2.11 returns it without). The writer names each
    # rank's files `__<rank in group>_<n>.distcp`; the call is collective, so all are on disk now.
    rank = 0 if _no_dist(group) else dist.get_rank(group)
    files = [f for f in os.listdir(directory) if f.startswith(f"__{rank}_")]
    if rank == 0:
        files.append(METADATA_FILE)
    return [os.path.join(directory, f) for f in sorted(files)]


def read_metadata(directory: str) -> Metadata:
    """The folder's DCP metadata (keys, global shapes, dtypes); no tensor data is read."""
    return dcp.FileSystemReader(directory).read_metadata()


def load_state(directory: str, state: dict, group=None) -> None:
    """Fill `state` in place from `directory`: tensors and Chunks are copied into (so views stay
    views), objects are replaced. Every key must be in the folder. Collective over `group`."""
    with _dcp_call():
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory), planner=_ChunkLoadPlanner(),
                 process_group=group, no_dist=_no_dist(group))


def read_full_state(directory: str, prefix: str = "") -> dict:
    """{key without prefix: whole tensor (CPU) or object} for every key of `directory` that starts
    with `prefix`, assembled from all ranks' chunks in this process alone (no process group)."""
    state = {}
    for key, md in read_metadata(directory).state_dict_metadata.items():
        if key.startswith(prefix):
            state[key] = (torch.empty(md.size, dtype=md.properties.dtype)
                          if isinstance(md, TensorStorageMetadata) else None)
    load_state(directory, state)
    return {k[len(prefix):]: v for k, v in state.items()}
