"""Batch-invariant kernels (CPU and Triton/GPU). They know no service."""
