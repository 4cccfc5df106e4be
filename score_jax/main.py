r"""Entry point: `python -m score_jax.main --config=configs/x.py[:arg]
--workdir=DIR`

  --config.field=value   overrides a config field (type-checked)
  --mode=train           trains to the end of the schedule (resuming from the
                         workdir's latest checkpoint), then evaluates (first
                         the initial weights too, with config.eval.base) and
                         writes WORKDIR/report.html
  --mode=eval            evaluates --checkpoint=latest|best|base|STEP, on the
                         current mesh whatever mesh saved it, and rewrites the
                         report
  --mode=aot             compiles the rollout and the train step for
                         --topology (a TPU slice such as v5e-16, no TPU
                         needed; empty: the local devices) and prints the
                         memory each device needs (score_jax/aot.py)
  --mode=adopt           checks that --checkpoint=latest|STEP, saved before
                         checkpoints had integrity records, restores
                         completely (shapes, config, every value finite),
                         then writes its record, so that training resumes
                         from it
  --multihost            starts jax.distributed on multi-host launches
  --dry-run              builds the config, the experiment and the abstract
                         state (shapes, dtypes, shardings; for --mode=aot on
                         the --topology's devices), checks what the mode
                         would read first (the splits, the training
                         problems, the micro-batches), prints what it would
                         run, and stops: nothing is trained, compiled or
                         written, and --multihost starts nothing
  --verbosity=0          the INFO logs too (Orbax's, absl's, ours); by
                         default the console shows the progress bar and a
                         line for each evaluation, checkpoint and phase

A config file may be given by any path (`--config=/path/to/configs/x.py`):
the package it belongs to is importable wherever the command runs.

Bad flags, config fields or files end the run with one line saying what is
wrong and what to do, before any work starts. SIGTERM or Ctrl-C saves at
the next check of a training step and exits with status 75 (see
score_jax/preemption.py); a second Ctrl-C stops at once.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from score_jax import (
  aot,
  checkpoints,
  data,
  evaluate,
  host_failures,
  multihost,
  preemption,
  scaling,
  sharding,
  train,
)
from score_jax import experiment as experiment_lib
from score_jax.report import pages
from score_jax.report import runs as runs_lib
from score_jax.tasks import rewards as rewards_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, e.g. configs/demo.py:quick.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs are written.")
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "eval", "aot", "adopt"], "What to run."
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  "",
  "--mode=aot: the TPU slice to compile for (v5e-16, "
  "v4-32, v5e:4x4, ...); empty: the local devices.",
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  "latest",
  "--mode=eval: latest, best (by validation "
  "accuracy, else training reward), base (the initial weights) or a step "
  "number; --mode=adopt: latest or a step number.",
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False, "Call jax.distributed.initialize() (multi-host pods)."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry-run",
  False,
  "Build and check what --mode would run, print it, and "
  "stop: nothing is trained, compiled or written.",
)


def _one_line(error: BaseException) -> str:
  """The gist of an error on one line (the last line of a nested traceback)."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  text = " ".join(lines)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]  # KeyError and AttributeError quote their message.
  if isinstance(error, AttributeError):
    text = f"unknown config field {text}"
  return text or type(error).__name__


def importable_config(argv: list[str]) -> None:
  """Makes the package of --config's file importable (`from configs import
  common`) wherever the command runs: its parent directory goes first on
  sys.path.

  Args:
    argv: the command line, before absl parses it.
  """
  for i, arg in enumerate(argv):
    value = (
      arg.split("=", 1)[1]
      if arg.startswith("--config=")
      else argv[i + 1]
      if arg == "--config" and i + 1 < len(argv)
      else None
    )
    if value is None:
      continue
    directory = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
    if os.path.exists(os.path.join(directory, "__init__.py")):
      sys.path.insert(0, os.path.dirname(directory))


def parse_flags(argv):
  """absl's parser, with config errors as one line instead of a traceback."""
  try:
    importable_config(argv)
    rest = flags.FLAGS(argv)
    if not flags.FLAGS["verbosity"].present:
      # The libraries' INFO logs (Orbax's, absl's, JAX's) only with
      # --verbosity=0: the console shows the progress bar and a line per
      # event.
      logging.set_verbosity(logging.WARNING)
    if _CONFIG.value is None:
      raise ValueError("--config is required, e.g. --config=configs/demo.py")
    _CONFIG.value.get("seed")  # A config file that failed to load raises here.
    if not _WORKDIR.value:
      raise ValueError("--workdir is required: the directory for outputs.")
    if "://" in _WORKDIR.value:
      raise ValueError(
        f"--workdir={_WORKDIR.value}: give a directory of this machine; "
        "for a bucket, mount it with Cloud Storage FUSE and pass its path "
        "(launch/run.py mounts gs://BUCKET at /gcs/BUCKET)."
      )
  except (
    flags.Error,
    AttributeError,
    KeyError,
    TypeError,
    ValueError,
    OSError,
    SyntaxError,
    ImportError,
  ) as e:
    sys.exit(f"score_jax: error: {_one_line(e)}")
  return rest


def main(argv):
  """Runs --mode (or its --dry-run) with the parsed flags. An error ends
  the process with one line; a save on a preemption notice, with
  preemption.EXIT_STATUS.

  Args:
    argv: the command line left after the flags; anything past the
      program's name is an error.
  """
  if len(argv) > 1:
    sys.exit(f"score_jax: error: unexpected arguments {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _DRY_RUN.value:
    try:
      devices = (
        aot.tpu_devices(_TOPOLOGY.value)
        if _MODE.value == "aot" and _TOPOLOGY.value
        else None
      )
      print(
        dry_run(experiment_lib.build(config, devices), _MODE.value, workdir)
      )
    except (ValueError, FileNotFoundError, aot.TopologyUnavailable) as e:
      sys.exit(f"score_jax: error: {_one_line(e)}")
    return
  if _MODE.value == "aot":  # One process, no devices of the slice needed.
    try:
      aot.run(config, _TOPOLOGY.value, workdir)
    except (ValueError, FileNotFoundError, aot.TopologyUnavailable) as e:
      sys.exit(f"score_jax: error: {_one_line(e)}")
    return
  sharding.initialize_distributed(
    _MULTIHOST.value, config.hosts.heartbeat_timeout_s
  )
  try:
    exp = experiment_lib.build(config)
    # What the run needs after training, checked before it starts.
    experiment_lib.check_workdir(workdir)
    data.check_splits(exp.task, config.eval)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"score_jax: error: {_one_line(e)}")
  logging.info(
    "model: %d parameters on mesh %s",
    exp.model.cfg.num_params,
    dict(exp.mesh.shape),
  )
  try:
    if _MODE.value == "adopt":
      _adopt(exp, workdir, _CHECKPOINT.value)
      return
    if _MODE.value == "train":
      if config.eval.base and not os.path.exists(
        os.path.join(workdir, "eval", "0", "metrics.json")
      ):
        _evaluate(exp, workdir, "base")
      train.train(exp, workdir)
      _evaluate(exp, workdir, "latest")
    else:
      _evaluate(exp, workdir, _CHECKPOINT.value)
    if multihost.is_writer():
      path, _ = pages.write_report(workdir)
      print(f"report: {path}{_skipped_note(workdir)}")
  except preemption.Preempted as e:
    print(f"score_jax: {e}", file=sys.stderr)
    sys.exit(preemption.EXIT_STATUS)
  except host_failures.HostFailed as e:
    host_failures.end(str(e))
  except (
    ValueError,
    OSError,
    train.TrainingStopped,
    runs_lib.ReportError,
    checkpoints.CheckpointError,
  ) as e:
    sys.exit(f"score_jax: error: {_one_line(e)}")


def dry_run(exp: experiment_lib.Experiment, mode: str, workdir: str) -> str:
  """--dry-run: builds and checks what `mode` would run first, and writes
  nothing.

  Args:
    exp: the experiment, built (config, tokenizer, task, model, mesh).
    mode: --mode.
    workdir: --workdir (only checked not to be a file).

  Returns:
    What the run would do, a few lines for the terminal.
  """
  cfg = exp.config
  if os.path.isfile(workdir):
    raise ValueError(
      f"--workdir={workdir} is a file, not a directory; pass "
      "a directory (it is created if missing)."
    )
  kind = exp.mesh.devices.flat[0].device_kind
  lines = [
    f"dry run of --mode={mode}: {exp.model.cfg.num_params:,} "
    f"parameters on mesh {dict(exp.mesh.shape)} of "
    f"{exp.mesh.devices.size} x {kind}"
  ]
  if mode != "aot":
    data.check_splits(exp.task, cfg.eval)
    lines.append(
      f"evaluation: {cfg.eval.split} split, "
      f"{len(exp.task.examples(cfg.eval.split))} problems"
    )
  if mode == "eval":
    state = exp.abstract_params()
  else:
    training = exp.training  # The micro-batches are checked here.
    if mode == "aot":
      state = exp.abstract_state()
    else:  # The training problems, the params' dtype.
      trainer = train.Trainer(exp, workdir)
      state = trainer.abstract_state
      lines.append(
        f"training: {len(trainer.examples)} problems, "
        f"{cfg.prompts_per_step} x {cfg.samples_per_prompt} "
        "episodes a step"
      )
    lines.append(
      "schedule: "
      + ", ".join(
        f"{p.name} {p.steps} steps ({p.batch})" for p in training.phases
      )
    )
  gib = sharding.bytes_per_device(state) / 2**30
  lines.append(
    f"{'state' if mode != 'eval' else 'params'} per device: {gib:.3f} GiB"
  )
  lines.append("nothing was trained, compiled or written")
  return "\n".join(lines)


def _skipped_note(workdir: str) -> str:
  """For the last line of a run: how many steps its train step refused."""
  path = os.path.join(workdir, "metrics.jsonl")
  training = runs_lib.read_training(path) if os.path.exists(path) else []
  steps = max((r["step"] for r in training), default=0)
  skipped = runs_lib.skipped_steps(training, steps)
  return f"; {runs_lib.skipped_note(skipped, steps)}" if skipped else ""


def _adopt(exp, workdir: str, which: str) -> None:
  """Writes the integrity record of checkpoint `which` (see --mode)."""
  if which in ("best", "base"):
    raise ValueError(
      f"--mode=adopt --checkpoint={which}: name latest or a "
      "step number (the best is chosen among intact "
      "checkpoints; base is not one)."
    )
  trainer = train.Trainer(exp, workdir)
  with trainer.checkpointer() as checkpointer:
    step = checkpoints.resolve_step(checkpointer, which)
    checked = checkpointer.adopt(
      step,
      trainer.abstract_state,
      exp.abstract_reference(),
      exp.config.to_json_best_effort(),
    )
  print(
    f"checkpoint {step} in {workdir}: {checked}; wrote its integrity "
    "record, a rerun resumes from it"
  )


def _evaluate(exp, workdir: str, which: str) -> None:
  """Evaluates checkpoint `which` (see --checkpoint) and prints the gist."""
  step, params = evaluate.restore(exp, workdir, which)
  rewards = exp.config.rewards
  with rewards_lib.RewardPool(
    exp.task.reward, rewards.num_workers, rewards.timeout_s
  ) as pool:
    result = evaluate.evaluate(exp, params, step, workdir, pool)
    if exp.config.eval.scaling_num_examples:
      scaling.evaluate_scaling(exp, params, step, workdir, pool)
  print(
    f"step {step}: accuracy@t1 {result['accuracy_t1']:.3f}  "
    f"accuracy@t2 {result['accuracy_t2']:.3f}  "
    f"delta {result['delta']:+.3f}  -> {workdir}/eval/{step}/"
  )


def run():
  """The command line's entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
