"""On the GPU (``-m gpu``): the top-k/top-p mask of a row is the same alone and amid any batch.

vLLM 0.26 masks with torch's sort and cumsum below 8 rows and with its Triton kernel from 8 rows.
Each is row-invariant on its own, but they disagree on about 1 row in 800 near the nucleus boundary
(bench/gpu_sampler_search.py: 10 of 8192 random rows on an H200; Triton keeps one token fewer), so a
seeded request alone and in a crowd could sample different tokens (issue 16). The invariant worker
routes every batch to the Triton kernel (invariant.worker.plugin). The rows the search found are
named in tests/data (regenerated from the search's seed, checked by their top 40 logits). Control: vLLM's own dispatcher
masks those rows differently alone than amid 8 or more rows.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the device)")]

VOCAB = 151936  # Qwen3's
SIZES = (2, 7, 8, 64, 512)
SEARCH = json.loads((Path(__file__).parent / "data" / "sampler_boundary_rows.json").read_text())
BOUNDARY = SEARCH["rows"]


def random_rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.linspace(0.5, 6.0, n, device="cuda")[:, None]  # entropy varied per row
    return torch.randn(n, VOCAB, generator=g, device="cuda") * scale


def boundary_rows() -> torch.Tensor:
    """The found rows, regenerated as the search made them (seed 5, 8192 rows of scaled normals):
    their tails matter too, since top-k's pivot search and the softmax read the whole row."""
    g = torch.Generator(device="cuda").manual_seed(SEARCH["seed"])
    n = SEARCH["n_rows"]
    rows = torch.tensor([r["row"] for r in BOUNDARY], device="cuda")
    found = torch.randn(n, VOCAB, generator=g, device="cuda")[rows] * torch.linspace(*SEARCH["scale"], n, device="cuda")[rows, None]
    for row, r in zip(found, BOUNDARY):  # the same rows as the search's (same torch, same device kind)
        assert row.topk(40).values.tolist() == r["top40"], "the search's rows did not regenerate"
    return found


def masked(fn, batch: torch.Tensor) -> torch.Tensor:
    n = batch.shape[0]
    return fn(batch.clone(), torch.full((n,), 40, device="cuda", dtype=torch.int32), torch.full((n,), 0.9, device="cuda"))


def differing(fn, test: torch.Tensor) -> dict[int, int]:
    """For each batch size, how many test rows get another mask at the head of that batch than alone."""
    fill = random_rows(max(SIZES), 2)
    alone = [masked(fn, test[i:i + 1])[0] for i in range(test.shape[0])]
    return {n: sum(not torch.equal(masked(fn, torch.cat([test[i:i + 1], fill[:n - 1]]))[0], alone[i])
                   for i in range(test.shape[0])) for n in SIZES}


def test_the_workers_mask_is_the_same_alone_and_amid_every_batch():
    from invariant.worker.plugin import invariant_top_k_top_p

    test = torch.cat([boundary_rows(), random_rows(32, 1)])
    assert differing(invariant_top_k_top_p, test) == {n: 0 for n in SIZES}


def test_control_vllms_dispatcher_masks_the_boundary_rows_differently_from_8_rows():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    got = differing(apply_top_k_top_p, boundary_rows())
    assert got[2] == got[7] == 0 and got[8] == got[64] == got[512] == len(BOUNDARY), got
