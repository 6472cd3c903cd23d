"""Document masking: attention that stays inside each document of a packed training window.

A window of the token cache holds several documents, each closed by one EOS token. With a document
mask, token t attends to token s only when s <= t and both belong to the same document; the EOS
belongs to the document it closes, the token after it starts the next one. Optionally the RoPE
positions restart at 0 at each document start (`document_positions`); the window's first document,
usually the tail of a document cut by the window start, starts at position 0 too.

Everything here is a pure function of the FULL sequences [B, T] (before any sequence-parallel
split), computed once per micro-batch: under Ulysses each rank attends over the full sequence after
the all-to-all, so it needs the full-sequence mask, not its chunk's.

Two engines, same mask: `flex_attention` with a `BlockMask` (fully masked blocks are skipped;
compiled, the fast path on CUDA), or SDPA with a boolean [B, 1, T, T] mask (CPU, and dropout, which
flex_attention does not implement).
"""

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def document_ids(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """tokens: [B, T] -> [B, T] int64: the index of each token's document in its window (0 for the
    first), i.e. the number of EOS tokens strictly before it."""
    ends = (tokens == eos_token_id).long()
    return ends.cumsum(1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids: [B, T] (from `document_ids`) -> [B, T] int64 position of each token in its document."""
    T = doc_ids.shape[1]
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(1).values


class DocumentMask(NamedTuple):
    """A document-causal mask over full sequences of length T, as one of the two engines takes it:
    `block_mask` (flex_attention) or `dense` ([B, 1, T, T] bool, True = attend; SDPA)."""
    block_mask: BlockMask | None
    dense: torch.Tensor | None


def build_document_mask(doc_ids: torch.Tensor, use_flex: bool) -> DocumentMask:
    """doc_ids: [B, T] full sequences (`document_ids`) -> the mask for `use_flex` (flex_attention)
    or SDPA, on doc_ids' device."""
    if use_flex:
        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
        B, T = doc_ids.shape
        return DocumentMask(create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device), None)
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
    return DocumentMask(None, (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None])


def document_layout(tokens: torch.Tensor, eos_token_id: int, positions: torch.Tensor, reset_positions: bool,
                    use_flex: bool) -> tuple[DocumentMask, torch.Tensor]:
    """tokens: [B, T] full sequences; positions: [1, T/sep] the global positions of this rank's chunk
    (`sequence_chunk`) -> (the full-sequence mask, the chunk's position ids: `positions` as they
    are, or [B, T/sep] positions inside each document when `reset_positions`)."""
    ids = document_ids(tokens, eos_token_id)
    if reset_positions:
        positions = document_positions(ids).index_select(1, positions[0])
    return build_document_mask(ids, use_flex), positions


_compiled_flex = None


def _flex_attention(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex_attention is fast only compiled: inside a compiled region (--use_compile) dynamo compiles
    the call itself; on CUDA otherwise, a copy compiled once per process; on CPU eager, torch's
    unfused reference implementation (what the CPU tests check the flex mask with), whose warning
    that it is unfused is known here and silenced."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, T, D] (H % Hkv == 0), T the full sequence -> [B, H, T, D],
    attention restricted by `mask`. Dropout needs the SDPA mask (flex_attention has none)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.block_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, dropout_p=dropout_p, enable_gqa=gqa)
    if dropout_p:
        raise ValueError("attention dropout needs the SDPA document mask (build_document_mask(..., use_flex=False))")
    return _flex_attention(q, k, v, mask.block_mask, gqa)
