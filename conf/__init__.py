"""Hydra configuration tree of wsol-bench (installed as wsol_bench.conf)."""
