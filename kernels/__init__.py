"""Triton kernels for the expert-specific operators (installed as ``ds_hexamoe.kernels``)."""
