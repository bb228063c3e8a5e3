"""The XLA flags a CPU or GPU run gets by default, and that the user's own flags win."""

from synth import xla_defaults


def test_defaults_are_appended_unless_the_user_set_them():
    flags = {"--xla_backend_optimization_level": "2"}
    assert xla_defaults.with_defaults("", flags) == "--xla_backend_optimization_level=2"
    assert (
        xla_defaults.with_defaults(" --xla_force_host_platform_device_count=4 ", flags)
        == "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=2"
    )
    own = "--xla_backend_optimization_level=3"
    assert xla_defaults.with_defaults(own, flags) == own


def test_apply_sets_cpu_defaults_only_for_cpu(monkeypatch):
    monkeypatch.setattr(xla_defaults, "has_gpu_plugin", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "")
    xla_defaults.apply()
    assert "--xla_backend_optimization_level=2" in xla_defaults.os.environ["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    xla_defaults.apply()
    assert xla_defaults.os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=1"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=4")
    monkeypatch.setenv("JAX_PLATFORMS", "")
    monkeypatch.setattr(xla_defaults, "has_gpu_plugin", lambda: True)
    xla_defaults.apply()
    assert xla_defaults.os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=4"  # The user's level wins.


def test_each_platform_gets_its_own_defaults():
    cpu, gpu = xla_defaults.CPU_FLAGS, xla_defaults.GPU_FLAGS
    assert xla_defaults.defaults_for("", gpu_plugin=False) == cpu
    assert xla_defaults.defaults_for("", gpu_plugin=True) == gpu
    assert xla_defaults.defaults_for("cpu", gpu_plugin=True) == cpu  # A CPU run on a GPU node.
    assert xla_defaults.defaults_for("cuda,cpu", gpu_plugin=True) == gpu
    assert xla_defaults.defaults_for("tpu", gpu_plugin=False) == {}
