"""Flax Linen networks of the method; sizes live in one table (sizes.py)."""
