"""On the GPU (``-m gpu``): the top-k/top-p mask of a row is the same alone and amid any batch.

vLLM 0.26 masks with torch's sort and cumsum below 8 rows and with its Triton kernel from 8 rows;
the invariant worker routes every batch to the Triton kernel (invariant.worker.plugin). Control:
vLLM's own dispatcher gives some row another mask amid a batch than alone.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the device)")]

VOCAB = 151936  # Qwen3's
ROWS = 48
SIZES = (2, 7, 8, 64, 512)


def rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.linspace(1.0, 4.0, n, device="cuda")[:, None]  # entropy varied per row
    return torch.randn(n, VOCAB, generator=g, device="cuda") * scale / 0.8


def differing(fn) -> dict[int, int]:
    test, fill = rows(ROWS, 1), rows(max(SIZES), 2)

    def masked(batch):
        n = batch.shape[0]
        return fn(batch.clone(), torch.full((n,), 40, device="cuda", dtype=torch.int32),
                  torch.full((n,), 0.9, device="cuda"))

    alone = [masked(test[i:i + 1])[0] for i in range(ROWS)]
    return {n: sum(not torch.equal(masked(torch.cat([test[i:i + 1], fill[:n - 1]]))[0], alone[i]) for i in range(ROWS))
            for n in SIZES}


def test_the_workers_mask_is_the_same_alone_and_amid_every_batch():
    from invariant.worker.plugin import invariant_top_k_top_p

    assert differing(invariant_top_k_top_p) == {n: 0 for n in SIZES}


def test_control_vllms_dispatcher_masks_a_row_differently_amid_a_batch():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    got = differing(apply_top_k_top_p)
    assert any(got.values()), f"vLLM's dispatcher gave every row the same mask: the test above proves nothing ({got})"
