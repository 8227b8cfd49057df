"""The decode profile's parts that decide its table (bench/gpu_decode_profile.py, run on the device):
kernel names to categories, traces to per-token sums, and the worker's profiler switch."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import bench_module
from invariant.worker.options import WorkerConfigError, WorkerOptions
from invariant.worker.server import PROFILE_DIR_ENV, profiler_args, vllm_argv


@pytest.fixture(scope="module")
def profile():
    return bench_module("gpu_decode_profile")


@pytest.mark.parametrize("name,cat", [
    ("kernel_unified_attention_2d", "attention"),
    ("void flash::flash_fwd_splitkv_kernel<...>", "attention"),
    ("nvjet_tst_128x64_64x8_1x1_h_bz_coopA_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm"),
    ("matmul_kernel_persistent", "gemm"),
    ("void vllm::rms_norm_kernel<c10::BFloat16>", "norm"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm"),
    ("void vllm::rotary_embedding_kernel<...>", "rotary"),
    ("void vllm::reshape_and_cache_flash_kernel<...>", "copy"),
    ("triton_poi_fused_mul_silu_slice_1", "elementwise"),
    ("_topk_topp_kernel", "sampling"),
    ("something_new", "other"),
])
def test_kernel_names_fall_in_their_category(profile, name, cat):
    assert profile.category(name) == cat


def test_a_trace_sums_to_kernel_time_per_token(profile, tmp_path):
    events = [{"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "dur": 30.0},
              {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "dur": 10.0},
              {"ph": "X", "cat": "kernel", "name": "kernel_unified_attention_2d", "dur": 20.0},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 999.0},  # host time: not a kernel
              {"ph": "i", "cat": "kernel", "name": "instant", "dur": 5.0}]
    path = tmp_path / "rank0.pt.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    (tmp_path / "broken.json").write_text("{not json")
    kernels = profile.read_trace(profile.trace_events(profile.trace_files(tmp_path)), cpu=False)
    assert kernels == {"nvjet_gemm": [30.0, 10.0], "kernel_unified_attention_2d": [20.0]}
    row = profile.summarize(kernels, concurrency=1, generated=4, wall=0.5)
    assert row["us_per_token"] == 15.0
    assert row["categories_us_per_token"] == {"attention": 5.0, "gemm": 10.0}
    assert row["top"][0] == {"name": "nvjet_gemm", "us_per_token": 10.0, "calls": 2}


def test_the_profiler_is_off_unless_a_benchmark_asks(monkeypatch, tmp_path):
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    assert profiler_args() == []
    argv = vllm_argv(WorkerOptions(model=str(tmp_path)), dtype="bfloat16", fingerprint="inv-0", cuda=True)
    assert "--profiler-config" not in argv
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    argv = vllm_argv(WorkerOptions(model=str(tmp_path)), dtype="bfloat16", fingerprint="inv-0", cuda=True)
    config = json.loads(argv[argv.index("--profiler-config") + 1])
    assert config["profiler"] == "torch" and config["torch_profiler_dir"] == str(tmp_path)
    monkeypatch.setenv(PROFILE_DIR_ENV, "relative/dir")
    with pytest.raises(WorkerConfigError, match="must be an absolute path"):
        profiler_args()


def test_the_device_profiles_render_as_table_and_plot(profile, tmp_path):
    """The profiles measured on the H200 (docs/results/gpu_decode_profile_h200) redraw from their
    JSON: the table says where the invariant decode step's kernel time went, per category."""
    src = Path(__file__).resolve().parents[1] / "docs/results/gpu_decode_profile_h200/triton_gemm/gpu_decode_profile.json"
    res = json.loads(src.read_text())
    copy = tmp_path / "p.json"
    copy.write_text(json.dumps(res))
    md = profile.markdown(res)
    assert "| gemm | 319.3 | 1663.6 | +1344.3 |" in md and "`matmul_kernel_persistent`" in md
    profile.plot(res, copy.with_suffix(".png"))
    assert copy.with_suffix(".png").stat().st_size > 10_000


def test_the_host_side_of_a_trace_gives_gpu_busy_idle_and_host_ops(profile, tmp_path):
    """At concurrency 1 the step is bound by the host: the profile must say how long the GPU waited
    and which host ops took the time (overlapping kernels count once)."""
    events = [{"ph": "X", "cat": "kernel", "name": "a", "ts": 0.0, "dur": 10.0},
              {"ph": "X", "cat": "kernel", "name": "b", "ts": 5.0, "dur": 10.0},   # overlaps a: busy 0-15
              {"ph": "X", "cat": "kernel", "name": "c", "ts": 40.0, "dur": 10.0},  # idle 15-40
              {"ph": "X", "cat": "cpu_op", "name": "aten::softmax", "ts": 1.0, "dur": 80.0},
              {"ph": "X", "cat": "cpu_op", "name": "aten::softmax", "ts": 90.0, "dur": 20.0},
              {"ph": "X", "cat": "cpu_op", "name": "aten::argmax", "ts": 2.0, "dur": 4.0}]
    path = tmp_path / "rank0.pt.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    host = profile.read_host(profile.trace_events(profile.trace_files(tmp_path)))
    assert (host["busy_us"], host["idle_us"]) == (25.0, 25.0)
    row = profile.summarize(profile.read_trace(profile.trace_events(profile.trace_files(tmp_path)), cpu=False), 1, 5, 0.1, host=host)
    assert (row["gpu_busy_us_per_token"], row["gpu_idle_us_per_token"]) == (5.0, 5.0)
    assert row["host_top"][0] == {"name": "aten::softmax", "us_per_token": 20.0, "calls": 2}
    other = dict(row, host_top=[{"name": "aten::softmax", "us_per_token": 2.0, "calls": 2}])
    res = {"meta": {"device": "d", "date": "x", "model": "m"},
           "modes": {"stock": {"decode": other}, "invariant": {"decode": row}}}
    md = profile.markdown(res)
    assert "| `aten::softmax` | 2.0 | 20.0 | +18.0 |" in md and "GPU busy / idle per token" in md
