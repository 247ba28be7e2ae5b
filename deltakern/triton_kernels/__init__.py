"""Triton kernels and their launchers: one module per op, shared dropout RNG in ``rng``."""
