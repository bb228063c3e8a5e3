"""Shared bits of the benchmark scripts: the machine description and a Markdown row printer."""

import datetime
import fcntl
import os
import platform
import subprocess
import sys
import time

import jax

_START = time.perf_counter()


def progress(message: str) -> None:
    """`message` with the seconds since the process started, on stderr at once (where a long GPU run is)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    """One line naming the CPU/GPU, core count and software versions, for BENCHMARKS.md."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    devices = jax.devices()
    return (
        f"{cpu}, {os.cpu_count()} cores, {len(devices)}× {devices[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}"
    )


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def header(title: str) -> None:
    print(f"## {title}\n")
    print(f"- machine: {machine()}")
    print(f"- date: {datetime.date.today().isoformat()}, commit {commit()}\n")


def timed(fn, *args, steps: int) -> float:
    """Seconds per call of `fn(*args)` after one warm-up call (compile excluded), device work included.

    With `BENCHMARK_LOCK` set to a file path, the timed calls hold an exclusive lock on it: benchmarks
    started side by side on one GPU then compile in parallel but never time while another one runs.
    """
    lock_path = os.environ.get("BENCHMARK_LOCK")
    lock = open(lock_path, "a") if lock_path else None  # noqa: SIM115 (held across the timed calls)
    try:
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps
    finally:
        if lock:
            lock.close()  # Closing releases the lock.


def compile_once(jitted, *args) -> tuple:
    """(compiled, FLOPs, bytes accessed) of one call of a jitted function: compiled once, counted by XLA.

    Time the returned executable, not `jitted`: a `lower().compile()` does not fill jit's own cache, so
    timing `jitted` would compile a second time (minutes for the large steps on a GPU). The compile time
    goes to stderr at once, so a run cut off by its time limit still says where the time went.
    """
    name = getattr(jitted, "__name__", "step")
    progress(f"compiling {name}")
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    progress(f"compiled {name} in {time.perf_counter() - t0:.1f} s")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)


def per_example_cost(jitted, g_params, make_batch, key, group: int, known: dict) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per example of a generation function that runs `group` examples per call.

    XLA's cost analysis counts a loop's body once, so generation that loops over groups of a batch
    (`synthesis_nets.generate` on CPU) is counted on a batch of one group: from `known` (group size ->
    per-example counts of the batches compiled so far) or by one more compile, which `known` then keeps.
    """
    if group not in known:
        _, flops, nbytes = compile_once(jitted, g_params, make_batch(group), key)
        known[group] = (flops / group, nbytes / group)
    return known[group]


# Profiler events of XLA:CPU's executor and thread pool, not ops (a thunk's "end: name" marks its end).
BOOKKEEPING_EVENTS = ("ThunkExecutor", "ThreadpoolListener", "end: ")


def op_time_by_kind(compiled, *args) -> list[tuple[str, float, int]]:
    """Where one call's time goes: (op kind, ms summed over the threads, calls), largest first.

    One call under `jax.profiler`; each XLA op's events are grouped by its name without the numeric
    suffix (`ynn_fusion.405` -> `ynn_fusion`), so a kind is e.g. the convolution library's fusions or one
    shape of elementwise fusion. Executor bookkeeping events are left out.
    """
    import collections
    import glob
    import re
    import tempfile

    jax.block_until_ready(compiled(*args))  # Warm: the traced call is a steady-state one.
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    nanoseconds, calls = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if (
                    line.name == "python"
                    or event.name.startswith(BOOKKEEPING_EVENTS)
                    or "Await" in event.name
                ):
                    continue
                kind = re.sub(r"[.\-]?\d+$", "", event.name)
                nanoseconds[kind] += event.duration_ns
                calls[kind] += 1
    return [(kind, ns / 1e6, calls[kind]) for kind, ns in nanoseconds.most_common()]


def time_synthesis_step(
    state, batch, frozen, *, models, config, g_tx, d_tx, steps: int, profile: bool = False
) -> tuple:
    """(s/step, FLOPs, bytes, G+D parameters, op times) of stage B's training step, compiled once.

    Op times: with `profile`, where one step's time goes (`op_time_by_kind`); otherwise empty.
    """
    import functools

    from synth.stages import synthesis

    step = jax.jit(
        functools.partial(synthesis.train_step, models=models, config=config, g_tx=g_tx, d_tx=d_tx)
    )
    key = jax.random.key(1)
    compiled, flops, nbytes = compile_once(step, state, batch, key, frozen)
    seconds = timed(compiled, state, batch, key, frozen, steps=steps)
    kinds = op_time_by_kind(compiled, state, batch, key, frozen) if profile else []
    n_params = sum(x.size for x in jax.tree.leaves((state.g_params, state.d_params)))
    return seconds, flops, nbytes, n_params, kinds


def print_op_times(title: str, kinds: list[tuple[str, float, int]], top: int = 15) -> None:
    """`op_time_by_kind`'s result as a Markdown table (the `top` largest kinds, shares of the total)."""
    total = sum(ms for _, ms, _ in kinds)
    print(f"\n{title}: {total:.0f} ms of op time over all threads\n")
    print("| op kind | ms | share | calls |\n| --- | --- | --- | --- |")
    for kind, ms, n in kinds[:top]:
        print(f"| `{kind}` | {ms:.1f} | {100 * ms / total:.1f} % | {n} |")
    print(flush=True)
