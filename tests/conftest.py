"""Test harness: 8 fake CPU devices, a persistent compilation cache, quiet oracles.

XLA_FLAGS must be set before jax is imported anywhere, so it happens at the top here.
"""
import os

from tests.helpers import TEST_XLA_FLAGS

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS}"
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


def pytest_collection_modifyitems(config, items):
    """The `heavy` tests first, longest first, the rest in their order: with xdist handing out
    one test at a time (`--maxschedchunk=1`, the Makefile's), the two workers share the long
    tests and the short ones fill in at the end, instead of one long test running alone last."""
    def seconds(item):
        mark = item.get_closest_marker("heavy")
        return mark.kwargs.get("seconds", 60) if mark else 0
    items[:] = sorted(items, key=lambda item: -seconds(item))     # stable: ties keep their order


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


# ---- the diffusion tests' shared pieces (test_sampler, test_inversion), built once per session ----

@pytest.fixture(scope="session")
def stand_in():
    """(denoise_fn, params) of the small conditional conv net standing in for a U-Net."""
    from tests.diffusion_helpers import make_stand_in
    return make_stand_in()


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory):
    """(torch U-Net, JAX denoise_fn, params) of a tiny random diffusers U-Net read by rig_jax."""
    from tests.diffusion_helpers import make_tiny_unet
    return make_tiny_unet(str(tmp_path_factory.mktemp("tiny_unet")))


@pytest.fixture(scope="module")
def inputs(request):
    """(latents, cond, uncond) drawn from the test module's INPUTS_SEED (default 0)."""
    from tests.diffusion_helpers import make_inputs
    return make_inputs(getattr(request.module, "INPUTS_SEED", 0))


@pytest.fixture(scope="session")
def schedule():
    """SD 1.x's DDIM schedule."""
    from rig_jax.diffusion import DDIMSchedule
    from tests.diffusion_helpers import SD_SCHEDULER
    return DDIMSchedule.from_diffusers_config(SD_SCHEDULER, "test")
