"""The worker: vLLM's OpenAI server with a numerics fingerprint and readiness gating.

Only this subpackage and ``invariant.kernels`` import torch and vLLM; the gateway and operator
images carry neither.
"""
