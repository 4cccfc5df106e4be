r"""SCoRe on MATH from a Gemma 2 2B checkpoint, the paper's hyperparameters.

Command (a v5e-16 slice; `:hf,v5e-64` for 64 chips; docs/tpu.md "Starting
from released weights" gets the weights into the bucket), from the Hugging Face
release (google/gemma-2-2b or gemma-2-2b-it: config.json, model*.safetensors,
tokenizer files), whose config.json gives the architecture and whose
tokenizer is used:
  python launch/run.py --name=score --zone=us-west4-a \
    --accelerator-type=v5litepod-16 \
    --config=configs/score_math_gemma2_2b.py:hf,v5e-16 \
    --workdir=gs://BUCKET/score_math_gemma2_2b -- \
    --config.init.path=/gcs/BUCKET/gemma-2-2b \
    --config.task.data_dir=/gcs/BUCKET/math_splits
which runs, on every worker,
  python -m score_jax.main --multihost \
    --config=configs/score_math_gemma2_2b.py:hf,v5e-16 \
    --workdir=/gcs/BUCKET/score_math_gemma2_2b \
    --config.init.path=/gcs/BUCKET/gemma-2-2b \
    --config.task.data_dir=/gcs/BUCKET/math_splits
From the Flax release (its Orbax checkpoint directory and tokenizer.model),
with the shapes of the gemma2-2b preset: `:gemma,v5e-16` and
--config.tokenizer_path=/gcs/BUCKET/gemma/tokenizer.model.

Everything else is configs/score_math.py: the paper's Adam lr 5e-6, 512
episodes per step (128 prompts x 4 samples), alpha 10, beta1 0.01, beta2
0.1, 1000 Stage I + 2000 Stage II steps, 1024 tokens per attempt, prompts up
to 512 tokens (longer training problems are dropped). Float32 master weights
and Adam state; the forward pass, the reference and the KV cache in bfloat16;
each layer rematerialised. Mesh (1, fsdp, 4): 4-way tensor parallel (8 heads,
4 kv heads, 9216 MLP units and the vocabulary split 4 ways) and FSDP over the
rest for decoding; training shards the batch and the params over all 16
(or 64) chips, FSDP with no tensor parallelism. The rollout's bfloat16 copy
of the weights is not split over fsdp, so decoding gathers nothing.

Memory per chip, from the compiler (`python -m score_jax.main
--config=configs/score_math_gemma2_2b.py:gemma,SLICE --mode=aot
--topology=SLICE --workdir=/tmp/aot`, jax 0.10.2, libtpu 0.0.42.1; the full
26 layers, 2703-slot episodes: 512-token prompts, two 1024-token attempts):
  v5e-16 (mesh 1x4x4; 8 train-step and 2 rollout micro-batches): peak
    8.87 GiB of 16 GiB (55%): train step 8.67 GiB, rollout 7.35 GiB beside
    1.53 GiB of optimizer state and reference (one rollout micro-batch
    would need 14.38 GiB, 90%).
  v5e-64 (mesh 1x16x4; 4 train-step micro-batches, 1 rollout): peak
    5.96 GiB (37%): train step 5.96 GiB, rollout 4.45 GiB beside 0.38 GiB.
Expected runtime (projected from the compiled programs, docs/tpu.md: each
op's FLOPs or HBM bytes at the chip's peak plus 1 us, collectives at the ICI
bandwidth, the host's grading), for a typical MATH workload (worst case in
brackets): v5e-16 38.2 s a step [57.4 s] (rollout 27.5 s, reference 2.2 s,
train step 8.5 s at 36% MFU on real tokens; 46.4 s [67.6 s] with latencies
and ICI at twice the cost), 32 hours for the 3000 steps; v5e-64 15.7 s
[21.7 s] (20.4 s [28.0 s] at 2x), 13 hours.
Expected result: not measured (no TPU here); the paper reports
(Gemini 1.5 Flash, not Gemma) Acc@t1 60.0 -> Acc@t2 64.4 on MATH500.
"""

from configs import common, score_math

# Per slice: the mesh (data, fsdp, tensor) and the micro-batches of the train
# step and of the rollout. On v5e-16 the KV cache of all 512 episodes is
# 7.4 GiB a chip, which beside the 2.2 GiB of state and the decode copy of
# the weights leaves one rollout micro-batch at 90% of HBM: two it is.
SLICES = {
  "v5e-16": dict(
    mesh_shape=(1, 4, 4), num_micro_batches=8, rollout_micro_batches=2
  ),
  "v5e-64": dict(
    mesh_shape=(1, 16, 4), num_micro_batches=4, rollout_micro_batches=1
  ),
}


def get_config(arg="hf,v5e-16"):
  """`arg`: the weights' format, "hf" (a Hugging Face directory) or "gemma"
  (the Flax release), and the slice, v5e-16 or v5e-64, comma-separated in
  any order (either may be left out)."""
  parts = [p for p in arg.split(",") if p]
  formats = [p for p in parts if p in ("hf", "gemma")]
  slices = [p for p in parts if p in SLICES]
  if (
    len(formats) + len(slices) != len(parts)
    or len(formats) > 1
    or len(slices) > 1
  ):
    raise ValueError(
      f"configs/score_math_gemma2_2b.py:{arg} is unknown; use "
      f"one of hf, gemma and one of {sorted(SLICES)}, e.g. "
      ":gemma,v5e-64."
    )
  layout = SLICES[slices[0] if slices else "v5e-16"]
  config = score_math.get_config()
  config.init.format = formats[0] if formats else "hf"
  # With "hf" the checkpoint's config.json replaces the preset.
  config.model.preset = "gemma2-2b"
  config.mesh_shape = layout["mesh_shape"]
  # Training shards the batch and the params over every chip (no tensor
  # parallelism: no per-layer activation all-reduces); decoding splits
  # heads, MLP units and the vocabulary 4 ways.
  config.sharding_rules = common.FSDP_RULES
  config.rollout.decode_rules = common.TENSOR_PARALLEL_DECODE
  # 256 tokens of logits at a time: fewer chunks, each of which reduces
  # the tied embedding's gradient over the batch.
  config.model.logits_chunk_len = 256
  config.num_micro_batches = layout["num_micro_batches"]
  config.rollout.num_micro_batches = layout["rollout_micro_batches"]
  return config
