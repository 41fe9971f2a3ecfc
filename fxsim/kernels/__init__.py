"""Numba integer kernels. They operate on code arrays and plain integers only."""
