"""Data sets the benchmarks train on, pulled and cached by the workflow."""
