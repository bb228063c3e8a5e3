"""Shared bits of the benchmark scripts: the machine description and a Markdown row printer."""

import datetime
import os
import platform
import subprocess

import jax


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
