"""Test harness: 8 fake CPU devices, a persistent compilation cache, quiet oracles.

XLA_FLAGS must be set before jax is imported anywhere, so it happens at the top here.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".cache", "jax")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    try:
        import diffusers
        diffusers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "conftest must force 8 CPU devices before jax starts"
    return jax.devices()
