"""Page "Benchmark Results": JAX vs PyTorch, standard vs DP-SGD, batch sweeps."""
