"""Make small Hugging Face checkpoints locally: no downloads, deterministic from a seed.

Tests and demos need real models (weights, config, tokenizer, chat template) that vLLM loads
like any other; none can be downloaded here, so we make them.
"""

from invariant.modelmaker.make import ARCHS, DTYPES, SIZES, ModelSpec, make_model

__all__ = ["ARCHS", "DTYPES", "SIZES", "ModelSpec", "make_model"]
