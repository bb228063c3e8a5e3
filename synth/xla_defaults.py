"""XLA settings a run gets by default, set in code before the backend starts, unless the user set them.

On a CPU-only install, LLVM optimisation level 2 instead of XLA's default 3: on 2 cores the demo's stage-A
and segmentor train steps compile in 20 s and 16 s instead of 31 s and 21 s (means of 3-4 runs each), and
run as fast (their heavy work is convolutions in precompiled library kernels, not generated code);
BENCHMARKS.md has the measurement. A short run (the demo, a notebook) spends much of its time compiling,
so this is the better trade there.

On a GPU install, cuDNN autotuning level 1 instead of XLA's default 4 (BENCHMARKS.md, "Stage B on a GPU"):
level 1 times each convolution's candidate algorithms once on uninitialised buffers, without the
correctness re-runs of the higher levels; at the default level the paper's 512² stage-B step compiled for
minutes on an H100, and level 0 runs cuDNN's algorithm 0 (no tensor cores), 30-1 000x slower. Level 1
compiled that step in 108 s on an H200 and its rows run at 100-240 TFLOP/s.

For `launch.py`, JAX's persistent compilation cache in the user's cache folder (`use_compilation_cache`):
a resumed run, a later stage and a rerun of the same config load their steps' executables instead of
compiling them again (stage B's step at the paper's 184×144 compiles for 22 minutes on a 2-core AVX2 CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform

CPU_FLAGS = {"--xla_backend_optimization_level": "2"}
GPU_FLAGS = {"--xla_gpu_autotune_level": "1"}
GPU_PLATFORMS = ("cuda", "gpu", "rocm")
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


def defaults_for(platforms: str, gpu_plugin: bool) -> dict[str, str]:
    """The default flags for `JAX_PLATFORMS`'s value and whether a GPU plugin is installed."""
    named = {name.strip() for name in platforms.split(",") if name.strip()}
    if named & set(GPU_PLATFORMS) or (not named and gpu_plugin):
        return GPU_FLAGS
    if named == {"cpu"} or (not named and not gpu_plugin):
        return CPU_FLAGS
    return {}  # A platform we have no numbers for (e.g. `tpu`).


def apply() -> None:
    """Sets this run's default XLA flags in the environment; call before JAX's backend starts."""
    defaults = defaults_for(os.environ.get("JAX_PLATFORMS", ""), has_gpu_plugin())
    if defaults:
        os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""), defaults)


# Bounded, which also makes JAX lock each entry while it is written (with filelock, a dependency), so
# processes sharing the folder never read a half-written executable; the oldest entries go first.
CACHE_MAX_BYTES = 8 << 30


def compilation_cache_dir() -> str:
    """`$XDG_CACHE_HOME/synth/jax/<machine>` (or under `~/.cache`), one folder per jaxlib and CPU.

    XLA:CPU's executables are compiled for this CPU's instruction set and for one jaxlib: a home folder
    shared by nodes of different CPUs (or a reinstalled jaxlib) must not hand one machine's executables
    to another, which jaxlib rejects with an error line per entry or, across versions, may crash on.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "synth", "jax", machine_tag())


def machine_tag() -> str:
    """A short name for this jaxlib on this CPU: its version and a digest of the CPU's model and features."""
    import jaxlib

    cpu = platform.machine() + platform.processor()
    with contextlib.suppress(OSError):  # Linux: the model and the feature flags of the first CPU.
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines(True)
        cpu += "".join(
            line for line in first if line.startswith(("model name", "flags", "Features", "CPU part"))
        )
    return f"jaxlib-{jaxlib.__version__}-{hashlib.sha256(cpu.encode()).hexdigest()[:12]}"


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache unless the user configured it; returns its folder.

    The user's own `JAX_COMPILATION_CACHE_DIR` (or `jax_compilation_cache_dir`) and size limit win;
    `JAX_ENABLE_COMPILATION_CACHE=false` turns the cache off (None is returned). Call before the first
    compile: JAX reads these settings when it first uses the cache.
    """
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    if jax.config.jax_compilation_cache_max_size == -1 and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return jax.config.jax_compilation_cache_dir
