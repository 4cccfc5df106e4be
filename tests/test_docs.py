"""Every command that README.md, launch/README.md, docs/ and the configs'
docstrings show runs, so that a documented command that fails fails here:

  python -m score_jax.main   with --dry-run (it builds the config, the
                             experiment and the abstract state, reads what
                             the mode reads first, and trains, compiles and
                             writes nothing); --mode=aot on the topology's
                             devices (test_aot.py compiles the documented
                             slice at reduced depth)
  python launch/*.py         with launch's --dry-run; the score_jax.main
                             commands it prints then run as above
  python -m MODULE           the module imports and takes the flags given
  pip install                the extras it names exist (.ci/run installs)
  python -m pytest           is .ci/run's command

The documents' stand-ins for the reader's files (BUCKET, DIR, SLICE, a
Hugging Face directory, MATH's splits, MBPP) become fixtures of the same
format. A config file is given by its absolute path from another
directory, as a user anywhere would.
"""

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "launch/README.md", "docs/*.md", "configs/*.py")
# Programs of other projects the documents show; not this repository's to
# check.
FOREIGN = ("huggingface-cli", "git", "gcloud", "gsutil", "tail")


def _texts():
  """(where, text) of every document: markdown files, and each config's
  module and function docstrings."""
  for pattern in DOCUMENTS:
    for path in sorted(glob.glob(os.path.join(REPO, pattern))):
      where = os.path.relpath(path, REPO)
      text = open(path, encoding="utf-8").read()
      if not path.endswith(".py"):
        yield where, text
        continue
      tree = ast.parse(text)
      for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.FunctionDef)):
          doc = ast.get_docstring(node)
          if doc:
            yield where, doc


def _split(text: str) -> list[str]:
  """The commands of one line or code span: `a && b` is two."""
  return [
    " ".join(part.split())
    for part in re.split(r"\s+&&\s+|;\s+", text)
    if part.strip()
  ]


def documented_commands() -> list[tuple[str, str]]:
  """(where, command) of every python and pip command the documents show:
  in code blocks (lines joined on trailing backslashes), in indented
  docstring lines, and in inline code spans."""
  found = []
  for where, text in _texts():
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    lines = [
      line
      for block in blocks
      for line in re.sub(r"\\\n\s*", " ", block).splitlines()
    ]
    if where.endswith(".py"):  # Docstrings: indented command lines.
      lines += [
        line
        for line in re.sub(r"\\\n\s*", " ", prose).splitlines()
        if line.startswith("  ") and "`" not in line
      ]
    spans = [
      span.replace("\\\n", " ") for span in re.findall(r"`([^`]+)`", prose)
    ]
    for line in lines + spans:
      for command in _split(line.split(" #")[0]):
        if command.startswith(("python ", "pip ")):
          found.append((where, command))
  return sorted(set(found))


COMMANDS = documented_commands()


def test_the_documents_show_commands():
  programs = {
    c.split()[2] if c.startswith("python -m") else c.split()[0]
    for _, c in COMMANDS
  }
  assert len(COMMANDS) > 25
  assert {"score_jax.main", "pip", "scripts.demo_results"} <= programs


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
  """The documents' placeholders, longest first, and what stands in for
  each: fixtures of the format the reader's files have."""
  tmp = tmp_path_factory.mktemp("documented")
  fixtures = os.path.join(REPO, "tests", "fixtures", "hf")
  math_splits = tmp / "math_splits"
  math_splits.mkdir()
  for split, count in (("train", 200), ("test", 20)):
    (math_splits / f"{split}.jsonl").write_text(
      "".join(
        json.dumps(
          {
            "problem": f"What is ${i} + 1$?",
            "answer": str(i + 1),
            "subject": "Prealgebra",
            "level": 1,
            "unique_id": f"{split}/{i}.json",
          }
        )
        + "\n"
        for i in range(count)
      )
    )
  mbpp = tmp / "mbpp.jsonl"
  mbpp.write_text(
    "".join(
      json.dumps(
        {
          "task_id": i,
          "text": f"Add {i}.",
          "code": f"def f(x):\n  return x + {i}",
          "test_list": [f"assert f(0) == {i}"],
          "test_setup_code": "",
          "challenge_test_list": [],
        }
      )
      + "\n"
      for i in range(1, 80)
    )
  )
  return sorted(
    {
      "/gcs/BUCKET/gemma-2-2b": os.path.join(fixtures, "gemma2"),
      "/gcs/BUCKET/llama3-8b": os.path.join(fixtures, "llama3"),
      "/gcs/BUCKET/gemma/tokenizer.model": os.path.join(
        fixtures, "gemma", "tokenizer.model"
      ),
      "/gcs/BUCKET/math_splits": str(math_splits),
      "/gcs/BUCKET/mbpp.jsonl": str(mbpp),
      "/gcs/BUCKET": str(tmp / "bucket"),
      "gs://BUCKET": "gs://bucket",
      "--config=...": "--config=configs/demo.py:quick",
      "DIR": str(tmp / "dir"),
      "SLICE": "v5e-16",
    }.items(),
    key=lambda item: -len(item[0]),
  )


def _substitute(command: str, stand_ins) -> str:
  for placeholder, value in stand_ins:
    command = re.sub(
      rf"(?<![\w/]){re.escape(placeholder)}(?![\w])", value, command
    )
  return command


def _absolute_config(args: list[str]) -> list[str]:
  """--config=configs/x.py as an absolute path: the runs below start
  elsewhere than the repository's root."""
  return [
    f"--config={os.path.join(REPO, a.split('=', 1)[1])}"
    if a.startswith("--config=configs/")
    else a
    for a in args
  ]


# score_jax.main's dry runs, one after another in one process (jax starts
# once) on one CPU device; a config whose mesh names its devices gets as
# many.
_DRY_RUNS = """
import contextlib, io, json, os, sys
from absl import flags
from score_jax import main
results = []
for args in json.load(sys.stdin):
  sys.argv = ["score_jax.main", *args, "--dry-run"]  # --config.x reads it.
  try:
    with contextlib.redirect_stdout(io.StringIO()) as out:
      main.main(main.parse_flags(sys.argv))
    results.append(out.getvalue())
  except SystemExit as e:
    results.append(f"exit: {e}")
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # The next config's overrides are its own.
print(json.dumps(results))
"""


def dry_runs(commands: list[str], stand_ins, cwd) -> list[str]:
  """What score_jax.main prints for each command with --dry-run, run from
  `cwd` with its config given by absolute path."""
  args = [
    _absolute_config(shlex.split(_substitute(c, stand_ins))[3:])
    for c in commands
  ]
  # Commands that differ in their workdir alone run once.
  key = lambda a: tuple(x for x in a if not x.startswith("--workdir="))
  unique = list({key(a): a for a in args}.values())
  printed = dict(zip(map(key, unique), _dry_runs_at_their_mesh(unique, cwd)))
  return [printed[key(a)] for a in args]


def _dry_runs_at_their_mesh(args: list[list[str]], cwd) -> list[str]:
  printed = _dry_runs(args, cwd, 1)
  for devices in sorted(
    {
      int(m.group(1))
      for p in printed
      if (m := re.search(r"needs (\d+) devices but 1 are", p))
    }
  ):
    again = [
      i for i, p in enumerate(printed) if f"needs {devices} devices" in p
    ]
    for i, output in zip(
      again, _dry_runs([args[i] for i in again], cwd, devices)
    ):
      printed[i] = output
  return printed


def _dry_runs(args: list[list[str]], cwd, devices: int) -> list[str]:
  result = subprocess.run(
    [sys.executable, "-c", _DRY_RUNS],
    input=json.dumps(args),
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=REPO,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    ),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def _printed_commands(output: str, program: str) -> list[str]:
  """The `program` commands (score_jax.main's, launch/run.py's) in a launch
  script's --dry-run output: alone on a line, or in an ssh --command."""
  found = re.findall(
    rf"python (?:-m )?{re.escape(program)} .*?(?= 2>&1|$)", output, re.M
  )
  return sorted({" ".join(command.split()) for command in found})


def _launch(command: str, stand_ins) -> list[str]:
  """Runs a launch command with --dry-run; returns the score_jax.main
  commands it prints (a sweep's runs on a slice launched in turn)."""
  args = shlex.split(_substitute(command, stand_ins))
  script, rest = args[1], args[2:]
  split = rest.index("--") if "--" in rest else len(rest)
  if "--dry-run" not in rest[:split]:
    rest.insert(split, "--dry-run")
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, script), *rest],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, (command, result.stderr[-2000:])
  # On the workers the bucket is mounted at /gcs/BUCKET.
  printed = [
    c.replace("/gcs/bucket", "/gcs/BUCKET")
    for c in _printed_commands(result.stdout, "score_jax.main")
  ]
  # A sweep's runs differ in their overrides alone, which the sweep
  # checks against the config itself: its first run stands for them.
  for run in _printed_commands(result.stdout, "launch/run.py")[:1]:
    printed += _launch(run.replace("gs://bucket", "gs://BUCKET"), stand_ins)
  if script.endswith("sweep.py"):
    printed = printed[:1]
  if script.endswith(("run.py", "sweep.py")):
    assert printed, result.stdout[-2000:]
  return printed


# Each module imported and its flags parsed in turn, in one process: absl's
# parser parses a command's flags (required ones included), for argparse
# the usage must name them.
_MODULES = """
import importlib, json, sys
from absl import flags
problems, defined = [], {}
for module, given in json.load(sys.stdin):
  try:
    if module not in defined:  # Each module's commands come together.
      for name in defined.pop(next(iter(defined), None), ()):
        delattr(flags.FLAGS, name)
      before = set(flags.FLAGS)
      if hasattr(importlib.import_module(module), "__path__"):  # A package:
        importlib.import_module(module + ".__main__")  # what -m runs.
      defined[module] = set(flags.FLAGS) - before
    if defined[module]:
      flags.FLAGS([module, *given])
    else:
      main = sys.modules.get(module + ".__main__") or sys.modules[module]
      actions = main.parser()._actions
      names = {o for a in actions for o in a.option_strings}
      for arg in given:
        if arg.startswith("--") and arg.split("=")[0] not in names:
          raise ValueError(f"unknown flag {arg}")
    problems.append("")
  except Exception as e:
    problems.append(f"{type(e).__name__}: {e}")
  flags.FLAGS.unparse_flags()
print(json.dumps(problems))
"""


def check_modules(commands: list[str], stand_ins) -> list[str]:
  """For each `python -m MODULE ...` command, what is wrong with it ("" for
  nothing): the module must import and take the flags given."""
  args = [
    (words[2], words[3:])
    for words in (shlex.split(_substitute(c, stand_ins)) for c in commands)
  ]
  order = sorted(range(len(args)), key=lambda i: args[i][0])
  result = subprocess.run(
    [sys.executable, "-c", _MODULES],
    input=json.dumps([args[i] for i in order]),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  problems = json.loads(result.stdout.splitlines()[-1])
  return [problems[order.index(i)] for i in range(len(args))]


def _extras() -> set[str]:
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.keyword)
      and node.arg == "extras_require"
      and isinstance(node.value, ast.Dict)
    ):
      return {
        str(k.value) for k in node.value.keys if isinstance(k, ast.Constant)
      }
  return set()


def _kind(command: str) -> str:
  words = command.split()
  if words[0] == "pip":
    return "pip"
  if words[1] == "-m":
    return {"pytest": "pytest", "score_jax.main": "main"}.get(
      words[2], "module"
    )
  return "launch" if words[1].startswith("launch/") else "other"


def test_every_documented_command_runs(stand_ins, tmp_path):
  """One test for all of them, so that jax starts once for the dry runs;
  the message names every command that failed and why."""
  failures = {}
  main_commands, module_commands = [], []
  for where, command in COMMANDS:
    kind = _kind(command)
    try:
      if kind == "pip":
        for extras in re.findall(r"\.\[([\w,]+)\]", command):
          assert set(extras.split(",")) <= _extras(), "unknown extras"
      elif kind == "pytest":
        assert command in open(os.path.join(REPO, ".ci", "run")).read(), (
          "not what .ci/run runs"
        )
      elif kind == "main":
        main_commands.append((where, command))
      elif kind == "launch":
        main_commands += [
          (f"{where}, launched: {command}", printed)
          for printed in _launch(command, stand_ins)
        ]
      elif kind == "module":
        module_commands.append((where, command))
      else:
        raise AssertionError("not a command of this repository")
    except AssertionError as e:
      failures[f"{where}: {command}"] = str(e)[-1000:]
  for (where, command), problem in zip(
    module_commands, check_modules([c for _, c in module_commands], stand_ins)
  ):
    if problem:
      failures[f"{where}: {command}"] = problem
  printed = dry_runs([c for _, c in main_commands], stand_ins, tmp_path)
  for (where, command), output in zip(main_commands, printed):
    if not output.rstrip().endswith("nothing was trained, compiled or written"):
      failures[f"{where}: {command}"] = output[-1000:]
  assert not failures, "\n".join(f"{k}\n  -> {v}" for k, v in failures.items())


def test_a_config_file_works_from_any_directory(tmp_path):
  """--config names a file by any path; its package (`from configs import
  common`) is importable from wherever the command runs, with only the
  package score_jax installed."""
  installed = tmp_path / "site"
  installed.mkdir()
  os.symlink(os.path.join(REPO, "score_jax"), installed / "score_jax")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      f"--config={REPO}/configs/demo.py:quick",
      f"--workdir={tmp_path}/run",
      "--dry-run",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(installed)),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "nothing was trained, compiled or written" in result.stdout
  assert not (tmp_path / "run").exists()  # A dry run writes nothing.


def test_the_quickstart_is_what_ci_runs():
  readme = open(os.path.join(REPO, "README.md")).read()
  (b,) = re.findall(r"# \(b\)[^\n]*\n(.*)\n", readme)
  assert b.strip() in open(os.path.join(REPO, ".ci", "run")).read()
