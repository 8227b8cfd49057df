"""Shared DeterministicModel fixtures for the operator tests."""

from __future__ import annotations

import copy

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"registry.example.com/invariant/worker@{DIGEST}"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def dm_spec(**overrides) -> dict:
    spec = {
        "model": {"servedName": "qwen3-8b", "huggingFace": {"repo": "Qwen/Qwen3-8B", "revision": REVISION}},
        "numerics": {"image": IMAGE, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "driverVersion": "580.95.05",
                     "dtype": "bfloat16", "tensorParallelSize": 1},
        "replicas": 2,
        "engineArgs": ["--max-model-len=8192"],
        "cache": {"ttlSeconds": 3600, "sharing": "tenant"},
    }
    spec = copy.deepcopy(spec)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        target = spec
        for key in path:
            target = target.setdefault(key, {})
        if value is DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    return spec


DELETE = object()
