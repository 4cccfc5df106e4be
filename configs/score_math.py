r"""SCoRe on MATH with the paper's hyperparameters, Gemma 2B shapes.

Command, on every host of a Cloud TPU slice (launch/run.py runs it there
and mounts the bucket gs://BUCKET at /gcs/BUCKET; see docs/tpu.md):
  python -m score_jax.main --multihost --config=configs/score_math.py \
    --workdir=/gcs/BUCKET/score_math \
    --config.tokenizer_path=/gcs/BUCKET/gemma/tokenizer.model \
    --config.task.data_dir=/gcs/BUCKET/math_splits

Data: PRM800K's math_splits (train.jsonl: the 7.5k MATH train + 4.5k test
problems; test.jsonl: MATH500). Paper hyperparameters (appendix table): Adam,
lr 5e-6, 3000 steps, 512 episodes per step, temperature 1.0, alpha 10,
beta1 0.01, beta2 0.1. Unspecified in the paper and chosen here: 4 samples per
prompt (128 prompts x 4), 1000 Stage I + 2000 Stage II steps, the base model as
reference, the k2 KL estimator, 1024 tokens per attempt.
On v5e-16 (the default mesh: FSDP over all 16 chips), from the compiler
(`--mode=aot --topology=v5e-16`, jax 0.10.2, libtpu 0.0.42.1; 16 train-step
and 4 rollout micro-batches): peak 8.81 GiB of 16 GiB a chip (55%).
Expected runtime, projected from the compiled programs (docs/tpu.md): 93.2 s a
step (rollout 62.0 s, train step 31.2 s; 114.5 s with latencies and ICI at
twice the cost), 78 hours for the 3000 steps.
Expected result: not measured (no TPU here); the paper reports (Gemini 1.5
Flash, not Gemma) Acc@t1 60.0, Acc@t2 64.4 on MATH500.
Start from released weights with --config.init.path=DIR (a Gemma release
checkpoint with --config.init.format=gemma, or a Hugging Face directory with
--config.init.format=hf); configs/score_math_gemma2_2b.py does so for Gemma 2
2B. From random init this config only exercises the pipeline.
"""

from configs import common


def get_config(arg=None):
  del arg
  config = common.base_config()
  config.task = common.ml_collections.ConfigDict(
    dict(
      name="math",
      data_dir=common.placeholder(str),
      tfds_dir=common.placeholder(str),
      grading_cpu_s=1.0,
    )
  )
  # Grading stops at grading_cpu_s of CPU time whatever the load; the pool's
  # wall-clock kill is only the backstop for a grader stuck in C code. At 10x
  # the CPU budget it cannot cut short an answer within that budget unless a
  # reward worker gets under a tenth of a core.
  config.rewards.timeout_s = 10.0
  config.model.preset = "gemma-2b"
  # Float32 master weights and Adam state (a bfloat16 weight cannot absorb
  # an lr-5e-6 update); the forward pass, the reference and the KV cache in
  # bfloat16.
  config.model.param_dtype = "float32"
  config.model.dtype = "bfloat16"
  config.model.remat = True
  config.mesh_shape = (1, -1, 1)
  # MATH prompts: training drops the few longer than 512 tokens.
  config.rollout.prompt_buckets = (128, 256, 512, 1024, 2048)
  config.rollout.max_prompt_len = 512

  config.schedule = "score"
  config.stage1_steps = 1000
  config.stage2_steps = 2000
  config.prompts_per_step = 128
  config.samples_per_prompt = 4
  config.num_micro_batches = 16
  # The rollout's 512 episodes in 4 passes: on 16 chips one pass of all of
  # them needs 14.8 GiB a chip (the compiler, --mode=aot).
  config.rollout.num_micro_batches = 4
  config.rollout.max_attempt_len = 1024
  config.rollout.temperature = 1.0
  config.objective.alpha = 10.0
  config.objective.beta1 = 0.01
  config.objective.beta2 = 0.1
  config.optimizer.learning_rate = 5e-6
  config.checkpoint.every_steps = 100
  config.rewards.num_workers = 8
  config.eval.num_examples = 0  # All of MATH500.
  config.eval.batch_size = 256
  return config
