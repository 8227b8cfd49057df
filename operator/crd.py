"""The DeterministicModel CustomResourceDefinition, as data.

The chart's ``crds/deterministicmodels.yaml`` is generated from this (``python -m
invariant.operator.crd``) and a test keeps the two identical, so the schema the operator
validates against is the one the cluster enforces.
"""

from __future__ import annotations

import sys
from typing import Any

from invariant.contract.engine_args import GPU_GEMM_DEFAULT, GPU_GEMMS
from invariant.operator.spec import API_GROUP, API_VERSION, DTYPES, KIND, PLURAL, SHARING
from invariant.contract import cache as cache_policy, fingerprint


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    }


def spec_schema() -> dict[str, Any]:
    string = {"type": "string"}
    return {
        "type": "object",
        "required": ["model", "numerics"],
        "properties": {
            "model": {
                "type": "object",
                "description": "Where the weights come from (exactly one source) and the name served in the API.",
                "properties": {
                    "servedName": {"type": "string", "maxLength": 128,
                                   "description": "Model name in the OpenAI API; defaults to metadata.name."},
                    "huggingFace": {
                        "type": "object", "required": ["repo", "revision"],
                        "properties": {
                            "repo": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$"},
                            "revision": {"type": "string", "pattern": "^[0-9a-f]{40}$",
                                         "description": "A commit hash: branches and tags can move."},
                        },
                    },
                    "pvc": {
                        "type": "object", "required": ["claimName", "path"],
                        "properties": {"claimName": string, "path": string},
                    },
                },
                "x-kubernetes-validations": [{
                    "rule": "has(self.huggingFace) != has(self.pvc)",
                    "message": "spec.model needs exactly one of huggingFace or pvc",
                }],
            },
            "numerics": {
                "type": "object",
                "description": "The pins that decide the output bits.",
                "required": ["image", "gpuProduct", "driverVersion"],
                "properties": {
                    "image": {"type": "string", "pattern": r"^[^@\s]+@sha256:[0-9a-f]{64}$",
                              "description": "Worker image by digest; a tag alone is refused."},
                    "gpuProduct": {"type": "string", "description": "nvidia.com/gpu.product label value."},
                    "driverVersion": {"type": "string", "pattern": r"^\d+\.\d+(\.\d+)?$"},
                    "dtype": {"type": "string", "enum": list(DTYPES), "default": "bfloat16"},
                    "tensorParallelSize": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1},
                    "gemm": {"type": "string", "enum": list(GPU_GEMMS), "default": GPU_GEMM_DEFAULT,
                             "description": "Whose GEMM the worker runs: auto (cuBLASLt without split-K from "
                                            "Hopper on, vLLM's Triton matmul before), cublaslt, vllm, or invariant's "
                                            "(docs/gpu-vllm.md). The fingerprint names the one it resolved to."},
                    "expectedFingerprint": {"type": "string", "pattern": fingerprint.PATTERN,
                                            "description": "Optional: the exact numerics fingerprint to require."},
                },
            },
            "replicas": {"type": "integer", "minimum": 0, "maximum": 64, "default": 1},
            "resources": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            "engineArgs": {"type": "array", "items": {"type": "string"}, "maxItems": 32,
                           "description": "Extra engine arguments from the operator's allow-list, as --flag=value."},
            "cache": {
                "type": "object",
                "properties": {
                    "ttlSeconds": {"type": "integer", "minimum": 0, "default": cache_policy.DEFAULT_TTL_SECONDS},
                    "sharing": {"type": "string", "enum": list(SHARING), "default": cache_policy.DEFAULT_SHARING,
                                "description": "tenant: one cache namespace per tenant; shared: opt-in across tenants."},
                },
            },
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "phase": {"type": "string"},
            "observedGeneration": {"type": "integer"},
            "readyReplicas": {"type": "integer"},
            "pinsHash": {"type": "string"},
            "declaredFingerprint": {"type": "string", "nullable": True},
            "conditions": {"type": "array", "items": _condition_schema()},
            "replicas": {"type": "array", "items": {"type": "object", "properties": {
                "pod": {"type": "string"}, "pins": {"type": "string"}, "ready": {"type": "boolean"},
                "fingerprint": {"type": "string", "nullable": True}, "matches": {"type": "boolean", "nullable": True},
            }}},
            "endpoints": {"type": "array", "items": {"type": "object", "properties": {
                "pod": {"type": "string"}, "url": {"type": "string"}, "fingerprint": {"type": "string"},
                "current": {"type": "boolean"},
            }}},
        },
        # kopf keeps its own progress records under status; let them through.
        "x-kubernetes-preserve-unknown-fields": True,
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": "deterministicmodel", "shortNames": ["dm"],
                      "listKind": f"{KIND}List", "categories": ["invariant"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Model", "type": "string", "jsonPath": ".spec.model.servedName"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                    {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
                    {"name": "Fingerprint", "type": "string", "jsonPath": ".status.declaredFingerprint"},
                    {"name": "GPU", "type": "string", "jsonPath": ".spec.numerics.gpuProduct", "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = "# Generated by `python -m invariant.operator.crd`; edit operator/crd.py, not this file.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(crd_yaml())
