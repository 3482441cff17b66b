"""Triton kernels of anil-fast (installed as anil_fast.kernels)."""
