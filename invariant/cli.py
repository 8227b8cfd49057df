"""The ``invariant`` command. Subcommands import their component lazily, so ``--help`` and the
light components (gateway, operator) never pay for torch or vLLM."""

from __future__ import annotations

import argparse
import os
import json
import sys
from typing import Callable, Sequence

from invariant import __version__

MAKE_STEPS = 4  # tokenizer, weights, safetensors, tokenizer + configs


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _model_make(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from invariant.modelmaker import ModelSpec, make_model
    from invariant.modelmaker.make import ModelMakerError

    spec = ModelSpec(arch=args.arch, size=args.size, dtype=args.dtype, seed=args.seed, close_logits=args.close_logits)
    with tqdm(total=MAKE_STEPS, desc="making model", unit="step", disable=args.quiet) as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)
        try:
            out = make_model(args.dir, spec, overwrite=args.overwrite, progress=progress)
        except ModelMakerError as exc:
            raise CLIError(str(exc)) from exc
    print(f"wrote {spec.arch} {spec.size} {spec.dtype} (seed {spec.seed}) to {out}")


def _worker_options(args: argparse.Namespace):
    from invariant.worker.options import WorkerOptions

    return WorkerOptions(
        model=args.model,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_gib=args.kv_cache_gib,
        invariance=not args.no_invariance,
        extra_vllm_args=tuple(args.engine_arg or ()),
        gpu_gemm=args.gpu_gemm,
        gpu_lm_head_graphs=args.gpu_lm_head_graphs,
        tp_invariant_parts=args.tp_invariant_parts,
        expect_gpu_product=args.expect_gpu_product,
        expect_driver_version=args.expect_driver_version,
        expect_fingerprint=args.expect_fingerprint,
    )


def _worker(args: argparse.Namespace) -> None:
    from invariant.worker.options import WorkerConfigError
    from invariant.worker.server import run

    try:
        run(_worker_options(args))
    except WorkerConfigError as exc:
        raise CLIError(str(exc)) from exc


def _fingerprint(args: argparse.Namespace) -> None:
    from invariant.worker.options import WorkerConfigError
    from invariant.worker.server import prepare

    try:
        _, state = prepare(_fingerprint_options(args), serving=False)
    except WorkerConfigError as exc:
        raise CLIError(str(exc)) from exc
    if args.json:
        print(json.dumps({"fingerprint": state.fingerprint, "parts": state.parts}, indent=2, sort_keys=True))
    else:
        print(state.fingerprint)


def _fingerprint_options(args: argparse.Namespace):
    from invariant.worker.options import WorkerOptions

    return WorkerOptions(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                         invariance=not args.no_invariance, gpu_gemm=args.gpu_gemm,
                         gpu_lm_head_graphs=args.gpu_lm_head_graphs, tp_invariant_parts=args.tp_invariant_parts,
                         extra_vllm_args=tuple(args.engine_arg or ()))


def _up(args: argparse.Namespace) -> None:
    from invariant.up import UpError, up

    try:
        up(args)
    except UpError as exc:
        raise CLIError(str(exc)) from exc


def _gateway(args: argparse.Namespace) -> None:
    from invariant.gateway.server import GatewayConfigError, run
    from invariant.contract.net import PortError, check_port_free

    try:
        check_port_free(args.host, args.port)
        run(host=args.host, port=args.port, model_flags=args.model or [], redis_url=args.redis_url,
            config_file=args.config, api_keys_file=args.api_keys, discover=args.discover)
    except (GatewayConfigError, PortError) as exc:
        raise CLIError(str(exc)) from exc


def _operator(args: argparse.Namespace) -> None:
    from kopf.cli import main as kopf_main

    argv = ["run", "-m", "invariant.operator.handlers", "--liveness", f"http://0.0.0.0:{args.health_port}/healthz"]
    argv += ["--all-namespaces"] if not args.namespace else [x for ns in args.namespace for x in ("--namespace", ns)]
    argv += ["--standalone"] if args.standalone else ["--peering", args.peering]
    if args.verbose:
        argv.append("--verbose")
    kopf_main(argv, standalone_mode=False)


def _bench_determinism(args: argparse.Namespace) -> None:
    from invariant.determinism import BenchError, run

    try:
        run(args)
    except BenchError as exc:
        raise CLIError(str(exc)) from exc


def _add_gemm_arg(p: argparse.ArgumentParser) -> None:
    from invariant.contract.engine_args import GPU_GEMM_DEFAULT, GPU_GEMMS

    p.add_argument("--gpu-gemm", default=GPU_GEMM_DEFAULT, metavar="{" + ",".join(GPU_GEMMS) + "}",
                   help="invariant CUDA worker's GEMM: auto (default: cuBLASLt without split-K from Hopper on, "
                        "vLLM's Triton matmul before), cublaslt, vllm (upstream's persistent Triton matmul) or "
                        "invariant (ours: fixed K chunks, a kernel per batch size)")
    p.add_argument("--gpu-lm-head-graphs", type=int, default=0, metavar="ROWS",
                   help="experimental: the invariant CUDA worker's lm_head GEMM (cuBLASLt) through CUDA graphs "
                        "for batches of up to ROWS rows, saving an eager library call per decode step (0: off)")


def _add_engine_arg(p: argparse.ArgumentParser, why: str = "") -> None:
    p.add_argument("--engine-arg", action="append", metavar="--FLAG[=VALUE]",
                   help="extra vLLM engine argument from the allow-list (repeatable), e.g. "
                        "--engine-arg=--max-num-seqs=64" + (f"; {why}" if why else ""))


def _add_worker_args(p: argparse.ArgumentParser, *, model_required: bool) -> None:
    p.add_argument("--model", required=model_required, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16 or float32; float16 on CUDA")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the directory name)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs per worker; on the CPU, processes per worker (one core range each)")
    p.add_argument("--tp-invariant-parts", type=int, default=0,
                   help="CPU: sum each row-parallel layer's K in this many fixed parts, so that every TP size "
                        "dividing it serves the same bits under one fingerprint (default 0: off)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache size in GiB (default 1)")
    _add_gemm_arg(p)
    p.add_argument("--no-invariance", action="store_true",
                   help="serve stock vLLM kernels (for controls and comparisons); the fingerprint says so")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invariant", description="Bitwise-reproducible LLM serving.")
    parser.add_argument("--version", action="version", version=f"invariant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="make local test and demo models", description="Local test and demo models.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    make = model_sub.add_parser(
        "make", help="write a small Hugging Face checkpoint, deterministically from a seed",
        description="Write a small Hugging Face checkpoint (safetensors, config, generation config, chat "
                    "template, byte-level BPE tokenizer trained on shipped text); same seed, same bytes.",
    )
    make.add_argument("dir", help="output directory")
    make.add_argument("--arch", default="qwen3", help="qwen3 (default) or llama")
    make.add_argument("--size", default="tiny", help="tiny (default), small or medium (0.4 B parameters, for GPUs)")
    make.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    make.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    make.add_argument("--close-logits", action="store_true",
                      help="near-tied logits, so batch variance flips tokens, not only logprobs")
    make.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(func=_model_make)

    worker = sub.add_parser("worker", help="serve a model with vLLM's OpenAI-compatible server",
                            description="Serve a model with vLLM's OpenAI-compatible server, in-process, with "
                                        "the numerics fingerprint and /invariant/ready.")
    _add_worker_args(worker, model_required=True)
    _add_engine_arg(worker)
    worker.add_argument("--expect-gpu-product", help="pinned GPU product (GFD label form); unready if it differs")
    worker.add_argument("--expect-driver-version", help="pinned NVIDIA driver version; unready if it differs")
    worker.add_argument("--expect-fingerprint", help="pinned numerics fingerprint; unready if it differs")
    worker.set_defaults(func=_worker)

    fp = sub.add_parser("fingerprint", help="print the numerics fingerprint a worker would serve",
                        description="Compute the numerics fingerprint of a model on this machine, without serving.")
    fp.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    fp.add_argument("--dtype", default="auto", help="as for `invariant worker`")
    _add_gemm_arg(fp)
    _add_engine_arg(fp, "as the worker gets them: on a GPU the step budget and sequence count are in the fingerprint")
    fp.add_argument("--tensor-parallel-size", type=int, default=1)
    fp.add_argument("--tp-invariant-parts", type=int, default=0, help="as for `invariant worker`")
    fp.add_argument("--no-invariance", action="store_true", help="the fingerprint of a --no-invariance worker")
    fp.add_argument("--json", action="store_true", help="print all parts as JSON")
    fp.set_defaults(func=_fingerprint)

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible gateway with the exact cache",
                        description="Run the gateway: OpenAI-compatible API in front of workers, with an exact "
                                    "Redis cache keyed on the numerics fingerprint and the resolved request.")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8080)
    gw.add_argument("--model", action="append", metavar="NAME=URL",
                    help="served model name and a worker base URL (repeatable; several URLs per name allowed)")
    gw.add_argument("--redis-url", default=None, help="redis://... (default: start an embedded Redis)")
    gw.add_argument("--config", default=None, help="JSON or YAML file: models, redis_url, api_keys_file")
    gw.add_argument("--discover", default=None, choices=["kubernetes"],
                    help="route to the endpoints DeterministicModel status publishes")
    gw.add_argument("--api-keys", default=None, help="JSON file of hashed API keys -> tenants (default: no auth)")
    gw.set_defaults(func=_gateway)

    op = sub.add_parser("operator", help="run the Kubernetes operator for DeterministicModel resources",
                        description="Run the kopf operator: renders worker Deployments and Services, folds worker "
                                    "fingerprints into DeterministicModel status.")
    op.add_argument("--namespace", action="append", help="namespace to watch (repeatable; default: all)")
    op.add_argument("--peering", default="invariant-operator",
                    help="kopf peering name: of several replicas only the highest-priority one acts")
    op.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    op.add_argument("--health-port", type=int, default=8080, help="liveness endpoint port (/healthz)")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(func=_operator)

    up = sub.add_parser("up", help="run everything on this machine (makes a default model if needed)",
                        description="Make the default tiny model if no --model is given, start the worker, wait "
                                    "until it is ready, print the URL, fingerprint and a curl line.")
    _add_worker_args(up, model_required=False)
    up.add_argument("--gateway-port", type=int, default=8080, help="gateway port (default 8080)")
    up.add_argument("--no-gateway", action="store_true", help="run the worker alone")
    up.add_argument("--state-dir", default=None, help="where default models and logs go (default ~/.cache/invariant)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness (default 300)")
    up.set_defaults(func=_up)

    parity = sub.add_parser("parity", help="check that a trainer forward gives a worker's logprobs bit for bit",
                            description="Sample greedy and seeded completions from a running CPU worker and "
                                        "score them with invariant.trainer.PolicyModel (true on-policy RL). Exit "
                                        "status 0 when every logprob is identical, 1 when one differs.")
    parity.add_argument("--url", required=True, help="the worker's base URL, e.g. http://127.0.0.1:8000")
    parity.add_argument("--model", required=True, help="the checkpoint directory the worker serves")
    parity.add_argument("--model-name", help="served model name (default: the worker's)")
    parity.add_argument("--prompts", type=int, default=8, help="prompts per mode (default 8)")
    parity.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (default 16)")
    parity.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the seeded sampling")
    parity.add_argument("--json", action="store_true", help="print the report as JSON")
    parity.set_defaults(func=_parity)
    bench = sub.add_parser("bench", help="benchmarks and experiments").add_subparsers(dest="bench", required=True)
    from invariant import determinism

    determinism.add_parser(bench)
    bench.choices["determinism"].set_defaults(func=_bench_determinism)
    return parser


class ParityMismatch(Exception):
    """Parity was checked and does not hold (exit status 1)."""


def _parity(args: argparse.Namespace) -> None:
    if args.prompts < 1 or args.max_tokens < 1:
        raise CLIError("--prompts and --max-tokens must be at least 1")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CLIError(f"--model {args.model}: no config.json there")
    from invariant.trainer.model import TrainerModelError
    from invariant.trainer.parity import ParityError, check

    try:
        report = check(args.url.rstrip("/"), args.model, model=args.model_name, prompts=args.prompts,
                       max_tokens=args.max_tokens, seed=args.seed)
    except (ParityError, TrainerModelError) as exc:
        raise CLIError(str(exc)) from exc
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for mode in ("greedy", "seeded"):
            r = report[mode]
            print(f"{mode}: {r['equal']}/{r['tokens']} logprobs identical, max |diff| {r['max_abs_diff']:.3g}, "
                  f"KL estimate {r['kl']:.3g}")
        print(f"parity {'holds' if report['identical'] else 'FAILS'} for {report['model']} "
              f"({report['fingerprint']})")
    if not report["identical"]:
        raise ParityMismatch()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except CLIError as exc:
        print(f"invariant: error: {exc}", file=sys.stderr)
        return 2
    except ParityMismatch:
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
