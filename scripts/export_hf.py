r"""Exports a run's policy as a Hugging Face model directory in the layout
of the Hugging Face releases: config.json (max_position_embeddings and RoPE
scaling included), generation_config.json (every stop id as an eos id),
safetensors, and the tokenizer with tokenizer_config.json holding the chat
template the run used, which transformers loads as it is.

  python -m scripts.export_hf --config=configs/x.py[:arg] --workdir=DIR \
      --checkpoint=latest|best|base|STEP --out=EXPORT_DIR [--config.x=y ...]

Give the config (and overrides) the run was trained with. The model must be
one of the Hugging Face families (Gemma, Gemma 2, Llama, Qwen2); params keep
their dtype. On a multi-host pod run it on every host with --multihost;
process 0 writes.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from score_jax import evaluate, experiment, sharding
from score_jax.models import hf

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "The run's experiment config.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "The run's workdir.", required=True
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  "latest",
  "latest, best (by validation accuracy, else "
  "training reward), base (the initial weights) or a step number.",
)
_OUT = flags.DEFINE_string(
  "out",
  None,
  "The directory to write; must not hold a model yet.",
  required=True,
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False, "Call jax.distributed.initialize()."
)


def main(argv):
  del argv
  sharding.initialize_distributed(_MULTIHOST.value)
  try:
    exp = experiment.build(_CONFIG.value)
    step, params = evaluate.restore(exp, _WORKDIR.value, _CHECKPOINT.value)
    hf.save(_OUT.value, params, exp.model.cfg, tokenizer=exp.tokenizer)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"export_hf: error: {e}")
  print(f"wrote {_OUT.value}: the params at step {step}")


if __name__ == "__main__":
  app.run(main)
