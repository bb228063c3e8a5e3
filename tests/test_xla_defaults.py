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


def test_launch_turns_on_a_compilation_cache_per_machine_unless_the_user_set_one(monkeypatch, tmp_path):
    import jax
    import jaxlib

    names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size", "jax_enable_compilation_cache")
    saved = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_compilation_cache_max_size", -1)
        folder = xla_defaults.use_compilation_cache()
        assert folder == str(tmp_path / "synth" / "jax" / xla_defaults.machine_tag())
        assert jax.config.jax_compilation_cache_dir == folder
        assert jax.config.jax_compilation_cache_max_size == xla_defaults.CACHE_MAX_BYTES  # Locked entries.
        assert xla_defaults.machine_tag().startswith(f"jaxlib-{jaxlib.__version__}-")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))
        jax.config.update("jax_compilation_cache_max_size", 1 << 20)
        assert xla_defaults.use_compilation_cache() == str(tmp_path / "own")  # The user's wins.
        assert jax.config.jax_compilation_cache_max_size == 1 << 20
        jax.config.update("jax_enable_compilation_cache", False)
        assert xla_defaults.use_compilation_cache() is None
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
