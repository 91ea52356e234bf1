"""Weights of the models shipped with wsol-bench."""
