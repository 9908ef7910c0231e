"""Limits of a tensor table that numpy-free code checks too (the manifest's columns use them)."""

MAX_DIMS = 16  # dimensions of one tensor
