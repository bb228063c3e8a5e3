"""Experiment configs: one file per dataset, each with `get_config(arg)` (see synth/configlib.py)."""
