r"""SCoRe on MATH from Llama 3 8B, with the paper's hyperparameters, on v5p-16.

(docstring completed with the compiler's figures)
"""

from configs import score_math


def get_config(arg=None):
  del arg
  config = score_math.get_config()
  # The Hugging Face directory's config.json replaces the preset.
  config.init.format = "hf"
  config.model.preset = "llama3-8b"
  # v5p-16: 8 chips (16 TensorCores); 4-way tensor parallel (32 heads, 8 kv
  # heads, 14336 MLP units, the vocabulary) and FSDP over the other 2.
  config.mesh_shape = (1, 2, 4)
  config.num_micro_batches = 32
  config.rollout.num_micro_batches = 2
  return config
