"""The XLA flags a CPU run gets by default, and that the user's own flags win."""

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
    assert xla_defaults.os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv("JAX_PLATFORMS", "")
    monkeypatch.setattr(xla_defaults, "has_gpu_plugin", lambda: True)
    xla_defaults.apply()
    assert xla_defaults.os.environ["XLA_FLAGS"] == ""
