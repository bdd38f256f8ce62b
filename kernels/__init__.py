"""Kernels for the SparCode search hot path and their plain torch references."""
