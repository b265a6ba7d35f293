"""Benchmarks: ``quality`` (merge quality on the model zoo) and ``speed`` (seme vs mergekit vs I/O)."""
