"""CodeTask: extraction, prompts, loaders, and rewards graded in the sandbox."""

import gzip
import json

import pytest

from score_jax import tasks
from score_jax.tasks import code, rewards, sandbox

# The programs graded here are the tests' own, so they may run unisolated on
# a machine where no isolating backend works (the first isolating one that
# works is used where there is one).
TASK = code.CodeTask(allow_unisolated=True)


def fenced(program):
  return f"Here is my answer.\n```python\n{program}\n```\nDone."


@pytest.fixture(scope="module")
def humaneval():
  return TASK.examples("test")


@pytest.fixture(scope="module")
def pool():
  with rewards.RewardPool(TASK.reward, num_workers=2, timeout_s=10.0) as p:
    yield p


def test_extract_program():
  assert (
    code.extract_program("```python\na = 1\n```\n```python\nb = 2\n```")
    == "b = 2\n"
  )
  assert code.extract_program("```\nc = 3\n```") == "c = 3\n"
  assert (
    code.extract_program("def f():\n  return 1\n") == "def f():\n  return 1\n"
  )
  assert code.extract_program("[BEGIN]\nx = 1\n[DONE]\ntrailing") == "\nx = 1\n"
  assert code.extract_program("x = 1\n[DONE]\nnext task") == "x = 1\n"
  assert TASK.extract_answer("   ") is None
  assert TASK.extract_answer(fenced("x = 1")) == "x = 1"


def test_instruction_is_the_papers():
  assert TASK.instruction == (
    "There might be an error in the code above because of lack of "
    "understanding of the question. Please correct the error, if any, and "
    "rewrite the solution. Only output the final correct Python program!"
  )


def test_humaneval_has_164_zero_shot_problems(humaneval):
  assert len(humaneval) == 164
  first = humaneval[0]
  assert first.meta["task_id"] == "HumanEval/0"
  assert TASK.format_problem(first).startswith(code.HUMANEVAL_INSTRUCTION)
  assert "def has_close_elements" in TASK.format_problem(first)
  assert "check(has_close_elements)" in first.answer_key.tests


def test_humaneval_canonical_solutions_pass_and_bare_prompts_fail(
  humaneval, pool
):
  full_programs = [
    fenced(e.answer_key.prefix + e.meta["canonical_solution"])
    for e in humaneval
  ]
  bodies_only = [e.meta["canonical_solution"] for e in humaneval]
  bare_prompts = [fenced(e.answer_key.prefix) for e in humaneval]
  references = [e.answer_key for e in humaneval]
  for responses, expected in (
    (full_programs, 1.0),
    (bodies_only, 1.0),
    (bare_prompts, 0.0),
  ):
    result = pool.score(responses, references)
    assert result.num_timeouts == 0 and result.num_errors == 0
    wrong = [
      e.meta["task_id"]
      for e, r in zip(humaneval, result.rewards)
      if r != expected
    ]
    assert not wrong, (expected, wrong)


def test_reward_never_raises():
  assert TASK.reward(fenced("x = 1"), object()) == 0.0
  assert TASK.reward(None, code.CodeAnswerKey("pass")) == 0.0


def test_a_batch_is_graded_in_order(pool):
  """Each program against its own tests, in order (throughput:
  benchmarks/rewards.py)."""
  references = [
    code.CodeAnswerKey(tests=f"assert f() == {i}") for i in range(100)
  ]
  responses = [fenced(f"def f():\n  return {i}") for i in range(100)]
  result = pool.score(responses, references[:50] + references[:50])
  assert result.rewards.tolist() == [1.0] * 50 + [0.0] * 50
  assert result.num_failed == 0


def _mbpp_row(task_id, text, function, test_list, setup=""):
  name = f"f{task_id}"
  return {
    "task_id": task_id,
    "text": text,
    "code": f"def {name}(x):\n  {function}",
    "test_list": [t.replace("F(", f"{name}(") for t in test_list],
    "test_setup_code": setup,
    "challenge_test_list": [],
  }


@pytest.fixture
def mbpp_path(tmp_path):
  rows = [
    _mbpp_row(
      i,
      f"Task {i}: add {i}.",
      f"return x + {i}",
      [f"assert F(1) == {1 + i}", f"assert F(0) == {i}"],
    )
    for i in range(1, 11)
  ]
  rows.append(
    _mbpp_row(
      11,
      "Double a number.",
      "return 2 * x",
      ["assert F(3) == 6", "assert F(BASE) == 2 * BASE"],
      setup="BASE = 7",
    )
  )
  rows.append(_mbpp_row(512, "Negate.", "return -x", ["assert F(2) == -2"]))
  path = tmp_path / "mbpp.jsonl"
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def test_mbpp_three_shot_prompt_and_splits(mbpp_path):
  task = code.CodeTask(mbpp_path=mbpp_path, allow_unisolated=True)
  train, validation = task.examples("train"), task.examples("validation")
  assert [e.meta["task_id"] for e in train] == [11]
  assert [e.meta["task_id"] for e in validation] == [512]
  prompt = task.format_problem(train[0])
  shot = (
    "You are an expert Python programmer, and here is your task: "
    "Task {i}: add {i}. Your code should pass these tests:\n\n"
    "assert f{i}(1) == {j}\nassert f{i}(0) == {i}\n[BEGIN]\n"
    "def f{i}(x):\n  return x + {i}\n[DONE]"
  )
  expected = "\n\n".join(shot.format(i=i, j=i + 1) for i in (2, 3, 4))
  expected += (
    "\n\nYou are an expert Python programmer, and here is your "
    "task: Double a number. Your code should pass these tests:\n\n"
    "assert f11(3) == 6\nassert f11(BASE) == 2 * BASE\n[BEGIN]\n"
  )
  assert prompt == expected


def test_mbpp_rewards(mbpp_path):
  task = code.CodeTask(mbpp_path=mbpp_path, allow_unisolated=True)
  example = task.examples("train")[0]
  assert (
    task.reward(
      example.meta["canonical_solution"] + "\n[DONE]", example.answer_key
    )
    == 1.0
  )
  assert (
    task.reward(fenced("def f11(x):\n  return x + x"), example.answer_key)
    == 1.0
  )
  assert (
    task.reward(fenced("def f11(x):\n  return 6"), example.answer_key) == 0.0
  )
  assert task.reward(fenced("while True:\n  pass"), example.answer_key) == 0.0


def test_bad_data_files_get_clear_errors(tmp_path, mbpp_path):
  with pytest.raises(FileNotFoundError, match="task_id.*test_list"):
    code.CodeTask(
      mbpp_path=str(tmp_path / "nope.jsonl"), allow_unisolated=True
    ).examples("train")
  with pytest.raises(ValueError, match="pass mbpp_path"):
    TASK.examples("train")
  with pytest.raises(ValueError, match="splits train, validation and test"):
    TASK.examples("dev")
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"task_id": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"broken.jsonl:1 lacks one of"):
    code.load_mbpp(str(broken))
  broken.write_text("not json\n")
  with pytest.raises(ValueError, match=r"broken.jsonl:1 is not JSON"):
    code.load_mbpp(str(broken))
  no_shots = tmp_path / "no_shots.jsonl"
  no_shots.write_text(
    "\n".join(line for line in open(mbpp_path) if '"task_id": 3,' not in line)
  )
  with pytest.raises(ValueError, match=r"lacks the few-shot MBPP tasks \[3\]"):
    code.load_mbpp(str(no_shots))
  humaneval = tmp_path / "HumanEval.jsonl.gz"
  with gzip.open(humaneval, "wt") as f:
    f.write('{"task_id": "HumanEval/0", "prompt": "x"}\n')
  with pytest.raises(ValueError, match="entry_point"):
    code.load_humaneval(str(humaneval))


def _one_line_error(**kwargs):
  with pytest.raises(ValueError) as error:
    code.CodeTask(**kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_code_rewards_refuse_an_unisolated_backend_unless_allowed():
  message = _one_line_error(backend="rlimits")
  assert message.startswith(
    "code rewards need an isolating sandbox and "
    "config.task.backend='rlimits' is not one"
  )
  assert "--config.rewards.allow_unisolated=True (unsafe" in message
  with pytest.raises(ValueError, match="need an isolating sandbox"):
    tasks.make({"name": "code", "backend": "rlimits"})
  # Allowed explicitly, the backend grades.
  task = tasks.make(
    {"name": "code", "backend": "rlimits"}, allow_unisolated=True
  )
  assert task.backend == "rlimits"
  reference = code.CodeAnswerKey("assert f() == 1")
  assert task.reward(fenced("def f():\n  return 1"), reference) == 1.0
  assert task.reward(fenced("def f():\n  return 2"), reference) == 0.0
  # Other tasks take the flag and ignore it.
  assert tasks.make({"name": "arithmetic"}, allow_unisolated=True)


@pytest.fixture
def no_isolating_backend(monkeypatch):
  """This process's probes say that only "rlimits" works, bubblewrap
  being installed (`bwrap_fails`) or not."""

  def machine(bwrap_fails=None):
    monkeypatch.setattr(
      sandbox.shutil, "which", lambda name: bwrap_fails and "/usr/bin/bwrap"
    )
    monkeypatch.setattr(
      sandbox,
      "_problems",
      {
        "bwrap": bwrap_fails or "bubblewrap is not installed",
        "namespaces": "it needs root",
        "rlimits": None,
      },
    )

  return machine


def test_without_an_isolating_backend_code_rewards_say_what_to_install(
  no_isolating_backend,
):
  no_isolating_backend()
  message = _one_line_error()
  assert message.startswith(
    "code rewards need an isolating sandbox and none "
    "works here: install bubblewrap (apt-get install "
    "bubblewrap); or set --config.rewards."
    "allow_unisolated=True (unsafe"
  )
  assert code.CodeTask(allow_unisolated=True).backend == "rlimits"
  no_isolating_backend(
    bwrap_fails="bwrap: No permissions to create a new namespace"
  )
  message = _one_line_error()
  assert (
    "bubblewrap is installed but fails (bwrap: No permissions to create "
    "a new namespace): enable unprivileged user namespaces"
  ) in message
  assert _one_line_error(backend="bwrap") == (
    "config.task.backend='bwrap' does not work here: bwrap: No permissions "
    "to create a new namespace."
  )


def test_an_isolating_backend_is_chosen_where_one_works():
  isolating = [
    b for b in sandbox.available_backends() if sandbox.isolation(b).full
  ]
  if not isolating:
    pytest.skip(
      f"no isolating sandbox backend works here: {sandbox.how_to_isolate()}"
    )
  assert code.CodeTask().backend == isolating[0]
  assert TASK.backend == isolating[0]
