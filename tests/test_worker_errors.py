"""Bad worker input fails fast with one actionable line (before vLLM is even imported)."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest

from conftest import free_port, invariant_cli


def run_worker(*args):
    started = time.monotonic()
    res = invariant_cli("worker", *args, timeout=60)
    return res, time.monotonic() - started


def assert_one_line_error(res, message):
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"invariant: error: {message}"]


def test_missing_model_dir(tmp_path):
    res, took = run_worker("--model", str(tmp_path / "nope"), "--port", str(free_port()))
    assert_one_line_error(res, f"model directory {tmp_path / 'nope'} does not exist: make one with "
                               f"`invariant model make {tmp_path / 'nope'}`")
    assert took < 30


def test_not_a_checkpoint(tmp_path):
    res, _ = run_worker("--model", str(tmp_path), "--port", str(free_port()))
    assert_one_line_error(res, f"{tmp_path} has no config.json: it is not a Hugging Face checkpoint directory")


def test_unsupported_architecture(tiny_model, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    res, _ = run_worker("--model", str(bad), "--port", str(free_port()))
    assert_one_line_error(res, "unsupported architecture (GPT2LMHeadModel): invariant serves "
                               "Qwen3ForCausalLM, LlamaForCausalLM")


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_unsupported_dtype_on_cpu(tiny_model, dtype):
    res, _ = run_worker("--model", str(tiny_model), "--dtype", dtype, "--port", str(free_port()))
    assert_one_line_error(res, f"unsupported dtype {dtype!r} on the CPU: choose one of auto, bfloat16, float32")


def test_port_in_use(tiny_model):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        res, took = run_worker("--model", str(tiny_model), "--port", str(port))
    assert_one_line_error(res, f"port {port} on 127.0.0.1 is already in use: stop what holds it or pass --port")
    assert took < 30


@pytest.mark.parametrize("flags,message", [
    (("--tensor-parallel-size", "2", "--tp-invariant-parts", "3"),
     "--tp-invariant-parts 3 is not a multiple of --tensor-parallel-size 2"),
    (("--tp-invariant-parts", "-1"), "--tp-invariant-parts -1 must be 0 (off) or a positive multiple of the TP size"),
    (("--tp-invariant-parts", "2", "--no-invariance"),
     "--tp-invariant-parts applies to an invariant worker, not with --no-invariance"),
    (("--tensor-parallel-size", "0"), "--tensor-parallel-size must be at least 1"),
])
def test_bad_tensor_parallel_options(tiny_model, flags, message):
    res, _ = run_worker("--model", str(tiny_model), *flags, "--port", str(free_port()))
    assert_one_line_error(res, message)


def test_up_reports_port_in_use(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        res = invariant_cli("up", "--port", str(port), "--gateway-port", str(free_port()), "--state-dir",
                            str(tmp_path), timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"invariant: error: port {port} on 127.0.0.1 is already in use: stop what holds it or pass --port"


def test_every_subcommand_has_help():
    for args in (["--help"], ["model", "make", "--help"], ["worker", "--help"], ["fingerprint", "--help"],
                 ["up", "--help"], ["gateway", "--help"], ["operator", "--help"]):
        res = invariant_cli(*args)
        assert res.returncode == 0 and "usage: invariant" in res.stdout, args


def test_engine_arg_that_breaks_invariance_is_refused(tiny_model):
    res, _ = run_worker("--model", str(tiny_model), "--port", str(free_port()),
                        "--engine-arg=--speculative-config={}")
    assert_one_line_error(res, "engine arg --speculative-config is refused: speculative decoding breaks batch invariance")


def test_the_worker_logs_its_own_lines_whoever_configured_logging_first(capsys):
    """On the GPU worker no invariant.worker line reached the log (root configured before ours):
    the worker's logger has its own handler at INFO, one line per message, whatever the root has."""
    import logging

    from invariant.worker.server import log_to_stderr

    root, ours = logging.getLogger(), logging.getLogger("invariant")
    saved = root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate
    ours.handlers = [h for h in ours.handlers if h.get_name() != "invariant"]
    root.addHandler(logging.StreamHandler())  # what a library configuring logging at import does
    root.setLevel(logging.WARNING)
    try:
        log_to_stderr()
        log_to_stderr()
        logging.getLogger("invariant.worker").info("kernel canary passed (1.2 s)")
        err = capsys.readouterr().err
    finally:
        root.handlers, ours.handlers = saved[0], saved[2]
        root.setLevel(saved[1])
        ours.setLevel(saved[3])
        ours.propagate = saved[4]
    assert err.count("kernel canary passed (1.2 s)") == 1 and "[invariant.worker]" in err
