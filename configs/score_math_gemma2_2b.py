r"""SCoRe on MATH from a Gemma 2 2B checkpoint, with the paper's hyperparameters.

(docstring rewritten once the compiler's figures are in)
"""

from configs import score_math

# Per slice: the mesh (data, fsdp, tensor) and the micro-batches of the train
# step and of the rollout.
SLICES = {
    "v5e-16": dict(mesh_shape=(1, 4, 4), num_micro_batches=32,
                   rollout_micro_batches=2),
    "v5e-64": dict(mesh_shape=(1, 16, 4), num_micro_batches=16,
                   rollout_micro_batches=1),
}


def get_config(arg="hf,v5e-16"):
  """`arg`: the weights' format, "hf" (a Hugging Face directory) or "gemma"
  (the Flax release), and the slice, v5e-16 or v5e-64, comma-separated in
  any order (either may be left out)."""
  parts = [p for p in arg.split(",") if p]
  formats = [p for p in parts if p in ("hf", "gemma")]
  slices = [p for p in parts if p in SLICES]
  if len(formats) + len(slices) != len(parts) or len(formats) > 1 or len(
      slices) > 1:
    raise ValueError(f"configs/score_math_gemma2_2b.py:{arg} is unknown; use "
                     f"one of hf, gemma and one of {sorted(SLICES)}, e.g. "
                     ":gemma,v5e-64.")
  layout = SLICES[slices[0] if slices else "v5e-16"]
  config = score_math.get_config()
  config.init.format = formats[0] if formats else "hf"
  # With "hf" the checkpoint's config.json replaces the preset.
  config.model.preset = "gemma2-2b"
  config.mesh_shape = layout["mesh_shape"]
  config.num_micro_batches = layout["num_micro_batches"]
  config.rollout.num_micro_batches = layout["rollout_micro_batches"]
  return config
