"""XLA settings a run gets by default, set in code before the backend starts, unless the user set them.

On a CPU-only install, LLVM optimisation level 2 instead of XLA's default 3: on 2 cores the demo's stage-A
and segmentor train steps compile in 20 s and 16 s instead of 31 s and 21 s (means of 3-4 runs each), and
run as fast (their heavy work is convolutions in precompiled library kernels, not generated code);
BENCHMARKS.md has the measurement. A short run (the demo, a notebook) spends much of its time compiling,
so this is the better trade there; a GPU install keeps XLA's defaults.
"""

from __future__ import annotations

import importlib.util
import os

CPU_FLAGS = {"--xla_backend_optimization_level": "2"}
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_plugins.xla_cuda12")


def has_gpu_plugin() -> bool:
    """Whether a JAX GPU plugin is installed (its XLA settings are left alone)."""
    for name in GPU_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # A dotted name whose parent package is absent.
            continue
    return False


def with_defaults(xla_flags: str, defaults: dict[str, str]) -> str:
    """`xla_flags` with each of `defaults` appended unless the flag is already there (the user's wins)."""
    present = {item.split("=", 1)[0] for item in xla_flags.split()}
    added = [f"{flag}={value}" for flag, value in defaults.items() if flag not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def apply() -> None:
    """Sets this run's default XLA flags in the environment; call before JAX's backend starts."""
    if os.environ.get("JAX_PLATFORMS", "").strip() not in ("", "cpu") or has_gpu_plugin():
        return
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""), CPU_FLAGS)
