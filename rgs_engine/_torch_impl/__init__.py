"""Plain PyTorch float64 references of every kernel (dense, slow; for tests and benchmarks)."""
