r"""SCoRe on MATH from a Gemma 2 2B checkpoint, with the paper's hyperparameters.

Command (64 TPU chips, e.g. a v5e-64 slice; see README "Starting from
released weights"), from the Hugging Face release (google/gemma-2-2b or
gemma-2-2b-it: config.json, model*.safetensors, tokenizer.model), whose
config.json gives the architecture and whose tokenizer is used:
  python -m score_jax.main --config=configs/score_math_gemma2_2b.py \
    --workdir=gs://BUCKET/score_math_gemma2_2b \
    --config.init.path=/path/to/gemma-2-2b \
    --config.task.data_dir=/path/to/prm800k/math_splits
From the Flax release (its Orbax checkpoint directory and tokenizer.model),
with the shapes of the gemma2-2b preset:
  python -m score_jax.main --config=configs/score_math_gemma2_2b.py:gemma \
    --workdir=gs://BUCKET/score_math_gemma2_2b \
    --config.init.path=/path/to/gemma2-2b-checkpoint \
    --config.tokenizer_path=/path/to/tokenizer.model \
    --config.task.data_dir=/path/to/prm800k/math_splits

Everything else is configs/score_math.py (the paper's Adam lr 5e-6, 512
episodes per step as 128 prompts x 4 samples, alpha 10, beta1 0.01, beta2
0.1, 1000 Stage I + 2000 Stage II steps, 1024 tokens per attempt). Params
and optimizer state stay float32 (bfloat16 would round away lr-5e-6 updates);
the forward pass and KV cache run in bfloat16, with each layer rematerialised.
Mesh (1, -1, 4): 4-way tensor parallel (Gemma 2 2B's 8 heads, 4 kv heads,
9216 MLP units and vocabulary all split 4 ways) and FSDP over the rest.
Memory: about 9 GB per chip on 64 chips, estimated from the shapes (README
has the sum); on 16 chips add --config.num_micro_batches=64.
Expected runtime: not measured (no TPU here); about a day on 64 v5e chips by
a FLOP estimate. Expected result: not measured; the paper reports (Gemini 1.5
Flash, not Gemma) Acc@t1 60.0 -> Acc@t2 64.4 on MATH500.
"""

from configs import score_math


def get_config(arg="hf"):
  """`arg`: "hf" (a Hugging Face directory) or "gemma" (the Flax release)."""
  if arg not in ("hf", "gemma"):
    raise ValueError(f"configs/score_math_gemma2_2b.py:{arg} is unknown; use "
                     ":hf or :gemma.")
  config = score_math.get_config()
  config.init.format = arg
  # With "hf" the checkpoint's config.json replaces the preset.
  config.model.preset = "gemma2-2b"
  config.model.param_dtype = "float32"
  config.model.dtype = "bfloat16"
  config.model.remat = True
  config.mesh_shape = (1, -1, 4)
  return config
