"""Test session set-up (root conftest, loaded before any test or doctest module imports JAX).

8 simulated CPU devices for the ring tests, set before JAX is imported; float64 enabled for parity.

The suite's time is mostly XLA compiling small programs, so the test processes compile with LLVM's
backend optimisation level 0 (``--xla_backend_optimization_level=0``: the same HLO and fusion passes,
less machine-code optimisation; about 40% off a compile-bound file such as test_kernels.py). The
executed notebooks run without it, as users run the code: notebook 02 holds every form to the float64
reference at full optimisation. ``JAX_DILATED_TEST_FULL_OPT=1`` runs the whole suite at full
optimisation.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if os.environ.get("JAX_DILATED_TEST_FULL_OPT", "") != "1" and "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# float64 parity needs x64 arrays; float32 checks pass explicit dtypes.
jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if _jax_has_gpu() else False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False
