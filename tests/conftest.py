"""Runs every test on 8 fake CPU devices (the flag must precede importing
jax), and holds the fixtures the test modules share."""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU compile tests only compile (no TPU here); let the test workers
# load libtpu side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Many tests (and the runs they start as subprocesses) compile the same
# small programs; JAX's persistent compilation cache, shared by the test
# workers and their subprocesses, compiles each once. The cache keys hold
# the program, the jax version and the flags, so a hit is the same
# executable.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), "score_jax_tests_jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from score_jax import experiment  # noqa: E402
from tests import runs as runs_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo() -> str:
  """The repository's root."""
  return REPO


@pytest.fixture
def tiny_config():
  """`tiny_config(**overrides)`: the tiny run's config (runs.TINY)
  with dotted overrides."""
  return runs_lib.tiny_config


@pytest.fixture
def tiny_flags():
  """`tiny_flags(**overrides)`: the same as score_jax.main flags."""
  return runs_lib.tiny_flags


@pytest.fixture
def build():
  """`build(config)`: the experiment on as many of the 8 devices as
  config.mesh_shape names (all of them for a -1)."""

  def build_(config):
    shape = tuple(config.mesh_shape)
    count = int(np.prod(shape)) if -1 not in shape else None
    return experiment.build(config, jax.devices()[:count])

  return build_


@pytest.fixture
def runs():
  """The helpers of training-run tests (tests/runs.py): tasks with a reward
  of the test's choosing, hooks that act mid-step, a run's results."""
  return runs_lib
