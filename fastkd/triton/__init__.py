"""Triton kernels (imported lazily: set TRITON_INTERPRET before importing them)."""
