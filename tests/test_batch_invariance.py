"""Batch invariance through the real vLLM engine on the CPU, with its control.

Each engine runs in its own process (tests/engine_run.py): the prompt under test is generated
alone, inside batches of 1 to 127 fillers of varied lengths, after its own or a sibling's prefix
was cached, and with a token budget so small that every prefill is split into chunks (at different
places alone and in a crowd). Every result must equal the prompt alone, bit for bit: token ids and
logprobs (floats compared with ==), greedy and seeded at temperature 0.8.

The control runs the same scenarios with the plugin off, on vLLM's own fallback GEMM
(``torch.nn.functional.linear``, see tests/hooks/sitecustomize.py) in fp32, and must find variance.
On this machine kind's AMD CPUs stock vLLM's default kernels happen to be row-invariant (docs/
cpu-invariance.md), so the control takes the stock path that is variant on every x86 we measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine_run
from conftest import hooked_env
from invariant.modelmaker import ModelSpec, make_model

pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent
BATCH_SIZES = (2, 5, 16, 33, 64, 128)
SMALL_BUDGET = 48  # tokens per engine step: every prefill of the test prompt is chunked


def run_engine(model: Path, mode: str, budget: int, out: Path, *flags: str, **env: str) -> dict:
    """tests/engine_run.py in a fresh process (``flags``: --eager, --canary); its JSON."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), str(model), mode, str(budget), str(out), *flags],
        capture_output=True, text=True, timeout=900, env={**os.environ, **env},
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=[("qwen3", "bfloat16"), ("qwen3", "float32"), ("llama", "bfloat16")],
                ids=lambda p: "-".join(p))
def runs(request, tmp_path_factory):
    """One large-budget and one small-budget invariant engine per architecture and dtype."""
    arch, dtype = request.param
    root = tmp_path_factory.mktemp(f"inv-{arch}-{dtype}")
    model = make_model(root / "model", ModelSpec(arch=arch, dtype=dtype))
    return {
        "dtype": f"{arch} {dtype}",
        "full": run_engine(model, "invariant", 2048, root / "full.json"),
        "chunked": run_engine(model, "invariant", SMALL_BUDGET, root / "chunked.json"),
    }


def assert_same(got: dict, ref: dict, what: str) -> None:
    assert got["token_ids"] == ref["token_ids"], f"{what}: token ids differ"
    assert got["logprobs"] == ref["logprobs"], f"{what}: logprobs differ (first at {first_diff(got, ref)})"


def first_diff(a: dict, b: dict) -> int | None:
    """The first step whose token id or logprob differs (None: equal as far as both go)."""
    pairs = zip(zip(a["token_ids"], a["logprobs"]), zip(b["token_ids"], b["logprobs"]))
    return next((i for i, (x, y) in enumerate(pairs) if x != y), None)


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_greedy_bitwise_equal_across_batch_sizes(runs, n):
    assert len(runs["full"]["alone"]["token_ids"]) == 20
    assert_same(runs["full"][f"batch_{n}"], runs["full"]["alone"], f"{runs['dtype']} batch {n}")


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_seeded_sampling_bitwise_equal_across_batch_sizes(runs, n):
    seeded = runs["full"]["seeded_alone"]
    assert seeded["token_ids"] != runs["full"]["alone"]["token_ids"], "temperature 0.8 should not be greedy"
    assert_same(runs["full"][f"seeded_{n}"], seeded, f"{runs['dtype']} seeded batch {n}")


def assert_scenarios_happened(full: dict, chunked: dict | None = None) -> None:
    """Each scenario is what it claims, by vLLM's own accounting (RequestOutput.num_cached_tokens,
    the prompt's token count): a run where the prefix cache never hit, or no prefill was split,
    must not pass as a proof."""
    block = full["block_size"]
    assert full["alone"]["cached_tokens"] == 0 and full["alone"]["prompt_tokens"] > block
    assert full["prefix_warm"]["cached_tokens"] >= block, "the warm prefix was not served from the cache"
    assert 0 < full["prefix_shared"]["cached_tokens"] < full["prefix_shared"]["prompt_tokens"], \
        "the shared prefix was not (partly) served from the cache"
    split = full["split_prefill"]
    assert split["head_tokens"] == full["budget"] - engine_run.SPLIT_AT and split["cached_tokens"] == 0
    assert split["prompt_tokens"] > engine_run.SPLIT_AT  # so FCFS must split it at SPLIT_AT
    if chunked is not None:
        assert chunked["alone_chunked"]["prompt_tokens"] > chunked["budget"] == SMALL_BUDGET


def test_the_scenarios_really_happened(runs):
    assert_scenarios_happened(runs["full"], runs["chunked"])


@pytest.mark.parametrize("case", ["prefix_warm", "prefix_shared"])
def test_cached_prefix_gives_the_same_bits(runs, case):
    assert runs["full"][case]["cached_tokens"] > 0, f"{case}: the prefix cache was not hit"
    assert_same(runs["full"][case], runs["full"]["alone"], f"{runs['dtype']} {case}")


@pytest.mark.parametrize("case", ["alone_chunked", "crowd_chunked"])
def test_chunked_prefill_gives_the_same_bits(runs, case):
    """Split at 48-token steps alone, elsewhere in a crowd, or not at all: the same bits."""
    assert runs["chunked"][case]["prompt_tokens"] > SMALL_BUDGET
    assert_same(runs["chunked"][case], runs["full"]["alone"], f"{runs['dtype']} {case}")


def test_a_prefill_split_by_a_full_step_gives_the_same_bits(runs):
    """In one engine: requests ahead of it leave the prompt 40 tokens of a step, the rest of its
    prefill comes a step later - the same bits as its prefill in one step."""
    assert_same(runs["full"]["split_prefill"], runs["full"]["alone"], f"{runs['dtype']} split prefill")


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """The controls' engines: plugin off, vLLM's fallback GEMM, fp32 (batch-variant on every x86 we
    measured), one with the large budget and one with the small one."""
    root = tmp_path_factory.mktemp("stock")
    model = make_model(root / "model", ModelSpec(dtype="float32"))
    env = hooked_env(INVARIANT_TEST_STOCK_GEMM="torch")
    return {"full": run_engine(model, "stock", 2048, root / "stock.json", **env),
            "chunked": run_engine(model, "stock", SMALL_BUDGET, root / "stock-chunked.json", **env)}


def differs(got: dict, ref: dict) -> bool:
    return got["token_ids"] != ref["token_ids"] or got["logprobs"] != ref["logprobs"]


def test_control_the_stock_scenarios_happened_too(stock):
    assert_scenarios_happened(stock["full"], stock["chunked"])


def test_control_without_plugin_detects_batch_variance(stock):
    """Control of the batch-size tests: the same scenarios, plugin off, fallback GEMM, fp32."""
    res = stock["full"]
    varied = [n for n in BATCH_SIZES if differs(res[f"batch_{n}"], res["alone"])]
    seeded_varied = [n for n in BATCH_SIZES if differs(res[f"seeded_{n}"], res["seeded_alone"])]
    assert varied, "stock vLLM showed no batch variance: the control cannot tell invariance from luck"
    assert seeded_varied, "stock vLLM showed no seeded batch variance"
    assert res["seeded_alone"]["token_ids"] != res["alone"]["token_ids"], "the seeded request did not sample"


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """The invariant engine with its GEMM swapped for one whose K split follows the row count
    (tests/hooks/sitecustomize.py, gemm-chunks-by-m), fp32: the prefix cache's control. Stock vLLM's
    fallback GEMM is no control there: on the CPUs we ran it gave a cached prefix the same bits."""
    root = tmp_path_factory.mktemp("variant")
    model = make_model(root / "model", ModelSpec(dtype="float32"))
    return run_engine(model, "invariant", 2048, root / "variant.json",
                      **hooked_env(INVARIANT_TEST_FAULT="gemm-chunks-by-m"))


def test_control_a_row_count_dependent_gemm_changes_cached_prefix_bits(variant):
    """Control of test_cached_prefix_gives_the_same_bits: a prefix-cache hit leaves fewer rows to
    prefill, and a GEMM that picks its reduction from the row count gives other bits."""
    assert variant["prefix_warm"]["cached_tokens"] > 0 and variant["prefix_shared"]["cached_tokens"] > 0
    for case in ("prefix_warm", "prefix_shared"):
        assert differs(variant[case], variant["alone"]), \
            f"{case}: a row-count-dependent GEMM gave the same bits with the prefix cached: the test proves nothing"


def test_control_without_plugin_chunked_prefill_changes_the_bits(stock):
    """Control of test_chunked_prefill_gives_the_same_bits: a prefill split into 48-token steps."""
    assert [c for c in ("alone_chunked", "crowd_chunked") if differs(stock["chunked"][c], stock["full"]["alone"])], \
        "stock vLLM gave the same bits chunked and in one step: the chunked-prefill test proves nothing"


def test_control_without_plugin_a_split_prefill_changes_the_bits(stock):
    assert differs(stock["full"]["split_prefill"], stock["full"]["alone"]), \
        "stock vLLM showed no variance behind a full step"
