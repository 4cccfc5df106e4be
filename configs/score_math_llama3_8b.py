r"""SCoRe on MATH from Llama 3 8B, with the paper's hyperparameters, on v5p-16.

Command (docs/tpu.md "Starting from released weights" gets the weights and
MATH into the bucket), from the Hugging Face release
(meta-llama/Meta-Llama-3-8B or -Instruct: config.json, model*.safetensors,
tokenizer files), whose config.json gives the architecture and whose
tokenizer and chat template are used:
  python launch/run.py --name=score --zone=us-east5-a \
    --accelerator-type=v5p-16 --config=configs/score_math_llama3_8b.py \
    --workdir=gs://BUCKET/score_math_llama3_8b -- \
    --config.init.path=/gcs/BUCKET/llama3-8b \
    --config.task.data_dir=/gcs/BUCKET/math_splits
which runs, on every worker,
  python -m score_jax.main --multihost \
    --config=configs/score_math_llama3_8b.py \
    --workdir=/gcs/BUCKET/score_math_llama3_8b \
    --config.init.path=/gcs/BUCKET/llama3-8b \
    --config.task.data_dir=/gcs/BUCKET/math_splits

Everything else is configs/score_math.py: the paper's Adam lr 5e-6, 512
episodes per step (128 prompts x 4 samples), alpha 10, beta1 0.01, beta2
0.1, 1000 Stage I + 2000 Stage II steps, 1024 tokens per attempt, prompts up
to 512 tokens. Float32 master weights and Adam state (the bfloat16 release
is cast up on load); the forward pass, the reference and the KV cache in
bfloat16; each layer rematerialised. v5p-16 is 8 chips (16 TensorCores,
one JAX device a chip): mesh (1, 2, 4). Training shards the batch and the
params over all 8 chips (FSDP, no tensor parallelism); decoding is 4-way
tensor parallel (32 heads, 8 kv heads, 14336 MLP units and the 128k
vocabulary split 4 ways) with the rows over the other 2.

Memory per chip, from the compiler (`python -m score_jax.main
--config=configs/score_math_llama3_8b.py --mode=aot --topology=v5p-16
--workdir=/tmp/aot`, jax 0.10.2, libtpu 0.0.42.1; the full 32 layers,
2703-slot episodes; 8 train-step micro-batches and 1 rollout): peak 44.56
GiB of 95 GiB (47%): rollout 35.21 GiB beside 9.35 GiB of optimizer state
and reference, train step 39.15 GiB.
Expected runtime (projected from the compiled programs, docs/tpu.md: each
op's FLOPs or HBM bytes at the chip's peak plus 1 us, collectives at the
ICI bandwidth, the host's grading), for a typical MATH workload (worst
case in brackets): 32.0 s a step [56.8 s] (rollout 13.5 s, reference 4.0
s, train step 14.6 s at 54% MFU on real tokens; 38.4 s [64.4 s] with
latencies and ICI at twice the cost), 27 hours for the 3000 steps.
Expected result: not measured (no TPU here); the
paper reports (Gemini 1.5 Flash, not Llama) Acc@t1 60.0 -> Acc@t2 64.4 on
MATH500.
"""

from configs import common, score_math


def get_config(arg=None):
  del arg
  config = score_math.get_config()
  # The Hugging Face directory's config.json replaces the preset.
  config.init.format = "hf"
  config.model.preset = "llama3-8b"
  # v5p-16 (8 chips): training shards the batch and the params over every
  # chip (no per-layer activation all-reduces); decoding splits heads, MLP
  # units and the vocabulary 4 ways and the rows over the other 2.
  config.mesh_shape = (1, 2, 4)
  config.sharding_rules = common.FSDP_RULES
  config.rollout.decode_rules = common.TENSOR_PARALLEL_DECODE
  config.num_micro_batches = 8
  config.rollout.num_micro_batches = 1
  return config
