"""Triton kernels and their launchers (installed as ``scd_triton.kernels``)."""
