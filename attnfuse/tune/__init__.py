"""Kernel selection: cost model, timing, and the on-disk memory of choices."""
