"""CPU half of the batch-invariant kernels."""
