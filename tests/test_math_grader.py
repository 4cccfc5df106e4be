"""Tests for MATH answer extraction, equivalence, MathTask and its limits."""

import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from score_jax.tasks import base, cpu_time, rewards
from score_jax.tasks import math as math_task

# (prediction, reference, equivalent). Every row is checked both ways round.
EQUIVALENCE_CASES = [
  # Fractions and their spellings.
  (r"\frac{1}{2}", r"\frac12", True),
  (r"1/2", r"\frac{1}{2}", True),
  (r"\dfrac{3}{4}", r"\frac{3}{4}", True),
  (r"\tfrac{3}{4}", "0.75", True),
  (r"\frac{7}{2}", "3.5", True),
  (r"\frac{6}{4}", r"\frac{3}{2}", True),
  (r"-\frac{1}{2}", r"\frac{-1}{2}", True),
  (r"\frac{x}{2}", "x/2", True),
  # Radicals and pi.
  (r"2\sqrt{2}", r"\sqrt{8}", True),
  (r"\sqrt 2", r"\sqrt{2}", True),
  (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", True),
  (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}2", True),
  (r"2\pi", r"2 \pi", True),
  (r"\pi/2", r"\frac{\pi}{2}", True),
  # Percent, degrees, units, currency.
  (r"50\%", "50", True),
  (r"8\%", "0.08", True),
  (r"30^\circ", "30", True),
  (r"30^{\circ}", "30", True),
  (r"5 \text{ cm}", "5", True),
  (r"5\text{ cm}^2", "5", True),
  ("5 cm", "5", True),
  (r"6\mbox{ inches}", "6", True),
  (r"\$5", "5", True),
  (r"\$5.00", "5", True),
  # Thousands separators and scientific notation.
  ("1,000", "1000", True),
  (r"1{,}000", "1000", True),
  ("1,000,000", r"10^6", True),
  (r"1.5 \times 10^3", "1500", True),
  (r"1.5 \cdot 10^{3}", "1500", True),
  ("1.5e3", "1500", True),
  ("10", "10.0", True),
  # Intervals, tuples, sets, lists of solutions.
  ("(1,2)", "(1, 2)", True),
  ("[1,2)", r"[1, 2)", True),
  (r"(-\infty, 3]", r"(-\infty,3]", True),
  (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)", True),
  (r"\{1,2\}", r"\{2,1\}", True),
  ("1,2", r"\{1,2\}", True),
  ("2, -2", "-2, 2", True),
  (r"\pm 2", "2,-2", True),
  # Matrices and vectors.
  (
    r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
    r"\begin{pmatrix}1\\2\end{pmatrix}",
    True,
  ),
  (
    r"\begin{pmatrix} \frac12 & 0 \\ 0 & 1 \end{pmatrix}",
    r"\begin{pmatrix}0.5&0\\0&1\end{pmatrix}",
    True,
  ),
  # Equations, inequalities, `x = ...` forms, polynomials.
  ("x > 3", "x>3", True),
  ("x > 3", r"(3, \infty)", True),
  (r"x \in [2,5)", "[2,5)", True),
  ("x = 5", "5", True),
  ("y = 2x+1", "y=1+2x", True),
  ("f(x)=x+1", "x+1", True),
  ("x^2+2x+1", "(x+1)^2", True),
  ("3+4i", "4i+3", True),
  # A ratio named by its terms is the ratio (issue 20: slow to grade).
  ("S_{MBCN}:S=7:32", "7:32", True),
  # Text answers and choices.
  (r"\text{Monday}", "Monday", True),
  (r"\text{ Evelyn }", r"\text{evelyn}", True),
  (r"\text{(B)}", "B", True),
  ("(C)", r"\text{(C)}", True),
  # Near misses that are NOT equal.
  ("1/3", "0.33", False),
  (r"\frac13", "0.333", False),
  ("(1,2)", "[1,2]", False),
  ("(1,2)", "(1,2]", False),
  ("2x", "2", False),
  ("-2", "2", False),
  ("3", "4", False),
  (r"\frac{1}{2}", r"\frac{1}{3}", False),
  (r"\sqrt{2}", "1.414", False),
  (r"-\infty", r"\infty", False),
  (r"\pi", r"180^\circ", False),
  ("10,5", "10.5", False),
  ("x > 3", r"x \geq 3", False),
  (
    r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
    r"\begin{pmatrix}1&2\\3&5\end{pmatrix}",
    False,
  ),
  (r"\text{east}", r"\text{west}", False),
  ("Evelyn", "Evenly", False),  # Anagrams: equal as products of symbols.
  ("A", "B", False),
  ("", "5", False),
]


@pytest.mark.parametrize("prediction,reference,expected", EQUIVALENCE_CASES)
def test_answers_match_both_ways(prediction, reference, expected):
  assert math_task.answers_match(prediction, reference) == expected
  assert math_task.answers_match(reference, prediction) == expected


EXTRACTION_CASES = [
  (
    "So x = 2.\nFinal Answer: The final answer is $\\frac{1}{2}$. "
    "I hope it is correct.",
    r"\frac{1}{2}",
  ),
  ("Final Answer: The final answer is $\\$5$. I hope it is correct.", r"\$5"),
  ("Final Answer: The final answer is $(1,2)$.", "(1,2)"),
  ("The final answer is 42.", "42"),
  ("The final answer is: $7$", "7"),
  ("Final Answer: The final answer is \\(3\\). I hope it is correct.", "3"),
  ("We get $\\boxed{\\frac{a}{b}}$.", r"\frac{a}{b}"),
  ("First \\boxed{1}, then \\boxed{\\{1, \\{2\\}\\}}", r"\{1, \{2\}\}"),
  (
    "Final Answer: The final answer is $\\boxed{9}$. I hope it is correct.",
    "9",
  ),
  (
    "Final Answer: The final answer is $3$. I hope it is correct.\n"
    "Wait, actually \\boxed{4}.",
    "4",
  ),
  (
    "\\boxed{3}\nFinal Answer: The final answer is $5$. I hope it is correct.",
    "5",
  ),
  ("So the answer is \\boxed 7$.", "7"),
  ("The answer is \\boxed{\\frac{1}{2}", None),  # Truncated.
  ("So \\boxed{1}, \\boxed{2} and \\boxed{3}.", "1, 2, 3"),
  ("Thus $k = \\boxed{45}$, $n = \\boxed{2}$.", "k = 45, n = 2"),
  ("x &= \\boxed{3} \\\\\n y &= \\boxed{4}", "x = 3, y = 4"),
  ("\\boxed{\\boxed{5}}", "5"),
  (
    "Final Answer: The final answer is $1$, $2$ or $3$. I hope it is correct.",
    "1, 2, 3",
  ),
  ("Final Answer: The volume of $ABCDEFGH$ is 120.", "120"),
  ("Final Answer: The value of $f(3)$ is $\\frac{1}{2}$ cm.", r"\frac{1}{2}"),
  ("Final Answer: Monday", "Monday"),
  ("Final Answer: The answer is: 120", "120"),
  ("**Final Answer**: $5$", "5"),
  ("**Final Answer:** The largest $n$ is **34**.", "34"),
  ("So the answer is $5$.", "5"),
  ("So \\(\\boxed{1}\\), \\(\\boxed{2}\\).", "1, 2"),
  # A later remark is not a statement of the answer.
  ("So \\boxed{5}. We checked that the answer is consistent.", "5"),
  ("I think it is 5.", None),
  ("", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION_CASES)
def test_extract_final_answer(response, expected):
  assert math_task.extract_final_answer(response) == expected


def test_extraction_is_linear_time():
  # Each box's argument is scanned only up to the box after it, and a line
  # of prose once.
  start = time.monotonic()
  for response in [
    "\\boxed{" * 5_000,
    "\\boxed{1}, " * 2_000 + "x",
    "Final Answer: " + "is $x$ " * 2_000,
  ]:
    math_task.extract_final_answer(response)
  assert time.monotonic() - start < 1.0


def test_extraction_looks_only_at_the_tail_of_long_responses():
  answer = "Final Answer: The final answer is $12$. I hope it is correct."
  assert math_task.extract_final_answer("x" * 10_000_000 + answer) == "12"
  # A box pushed out of the scanned tail does not count.
  long_tail = "\\boxed{1}" + "y" * (math_task.MAX_RESPONSE_CHARS + 1)
  assert math_task.extract_final_answer(long_tail) is None


MATH_TASK = math_task.MathTask()


def _response(answer):
  return (
    f"Some steps.\nFinal Answer: The final answer is ${answer}$. "
    "I hope it is correct."
  )


def test_math_task_prompts_and_reward():
  task = math_task.MathTask()
  assert task.first_turn_prompt.startswith("You are a math expert.")
  assert task.first_turn_prompt.endswith(
    '"Final Answer: The final answer is $answer$. I hope it is correct."'
  )
  assert task.instruction.startswith("There might be an error in the solution")
  assert "Only output the final solution!" in task.instruction
  example = base.Example(problem="What is $1+1$?", answer_key="2")
  assert task.format_problem(example).endswith("Problem:\nWhat is $1+1$?")
  assert task.format_problem(example).startswith(task.first_turn_prompt)
  assert task.reward(_response("2"), "2") == 1.0
  assert task.reward(_response("2.0"), "2") == 1.0
  assert task.reward(_response("3"), "2") == 0.0
  assert task.reward("no answer here", "2") == 0.0
  assert task.reward(_response("2"), None) == 0.0
  assert task.extract_answer(_response(r"\frac{1}{2}")) == r"\frac{1}{2}"
  with pytest.raises(ValueError, match="data_dir"):
    task.examples("train")


# (response, reference, reward): whole responses through MathTask.reward.
REWARD_CASES = [
  # Boxes that follow one another spell one answer (issue 20's forms).
  # Both pairs solve the problem; the reference lists them.
  (r"The solutions are $\boxed{(2,2)}, \boxed{(6,2)}$.", "(2,2),(6,2)", 1),
  # The three boxed values are the set's elements.
  (r"So $n$ is \boxed{1}, \boxed{2}, \boxed{3}.", r"\{1,2,3\}", 1),
  # Named values, against named values and against the ordered pair (k, n).
  (r"Hence $k = \boxed{45}, n = \boxed{2}$.", "k=45, n=2", 1),
  (r"Hence $k = \boxed{45}, n = \boxed{2}$.", "(45, 2)", 1),
  # Own forms: both roots; an aligned display; a tuple with a repeated
  # entry; three named values with "and"; several math segments.
  (r"The roots are \boxed{2} and \boxed{-2}.", r"\pm 2", 1),
  (
    "\\begin{align*} x &= \\boxed{3} \\\\\n y &= \\boxed{4} \\end{align*}",
    "(3,4)",
    1,
  ),
  (r"Both coordinates are \boxed{5}, \boxed{5}.", "(5,5)", 1),
  (r"So $a = \boxed{1}$, $b = \boxed{-1}$ and $c = \boxed{0}$.", "(1,-1,0)", 1),
  (
    "Final Answer: The final answer is $x = 1$ or $x = -3$. I hope it is "
    "correct.",
    "1, -3",
    1,
  ),
  # Not the answer: values swapped between names; pair in the wrong order;
  # a hedge between two values (one of them right); an element missing;
  # a hedge in a statement.
  (r"Hence $k = \boxed{2}, n = \boxed{45}$.", "k=45, n=2", 0),
  (r"So $(k, n)$ is \boxed{2}, \boxed{45}.", "(45, 2)", 0),
  (r"The answer is \boxed{1} or \boxed{2}.", "2", 0),
  (r"So $n$ is \boxed{1}, \boxed{2}.", r"\{1,2,3\}", 0),
  # Two values stated where one is asked: a hedge unless the reference
  # names the other one too.
  (r"So $a = \boxed{2}$, $b = \boxed{5}$.", "5", 0),
  (
    "Final Answer: The final answer is $1$ or $2$. I hope it is correct.",
    "2",
    0,
  ),
  # A box earlier in the working is not part of the answer.
  (r"First \boxed{1}, then \boxed{2}.", "2", 1),
  # A final answer in prose is graded by what it states the value is.
  ("Final Answer: The volume of $ABCDEFGH$ is 120.", "120", 1),
  ("Final Answer: The largest $n$ is 34.", "34", 1),
  (
    "Final Answer: The area of the triangle is $\\frac{25}{2}$ square units.",
    r"\frac{25}{2}",
    1,
  ),
  ("Final Answer: There are 12 ways.", "12", 1),
  (
    "Final Answer: The probability equals $\\frac{1}{6}$. I hope it is "
    "correct.",
    r"\frac16",
    1,
  ),
  ("Final Answer: The day is Monday.", r"\text{Monday}", 1),
  # The value, not a remark after it or a number in the subject.
  ("Final Answer: The answer is 5, which is prime.", "5", 1),
  ("Final Answer: The number of primes that are below 10 is 4.", "4", 1),
  # A hedge, with math or with a plain number; a negation.
  ("Final Answer: The answer is $5$ or $6$.", "5", 0),
  ("Final Answer: The answer is 0.75 or $\\frac{3}{5}$.", r"\frac35", 0),
  ("Final Answer: The answer is not $5$.", "5", 0),
  # Without "final answer" or a box, "the answer is" states it; after a
  # box, it is a remark.
  ("So the answer is $5$.", "5", 1),
  (r"So \boxed{5}. We checked that the answer is consistent.", "5", 1),
  # Not the answer: the wrong value; the sign; a number in the subject.
  ("Final Answer: The volume of $ABCDEFGH$ is 100.", "120", 0),
  ("Final Answer: The sum of the roots is $-3$.", "3", 0),
  ("Final Answer: The value of $f(120)$ is 7.", "120", 0),
  # Slow to grade the first time (~0.4 s of CPU in a fresh process).
  (
    "Final Answer: The final answer is $S_{MBCN}:S=7:32$. I hope it is "
    "correct.",
    "7:32",
    1,
  ),
]


@pytest.mark.parametrize("response,reference,expected", REWARD_CASES)
def test_reward_of_whole_responses(response, reference, expected):
  assert MATH_TASK.reward(response, reference) == expected


PATHOLOGICAL_ANSWERS = [
  r"10^{10^{10^{10}}}",
  r"2^{2^{2^{2^{2^{2}}}}}",
  "9!!!!!!",
  "1" * 1_000_000,
  "{" * 10_000 + "1" + "}" * 10_000,
  "(" * 300 + "1" + ")" * 300,
]


def test_pathological_answers_score_zero_within_the_limit():
  task = math_task.MathTask()
  responses = [_response(answer) for answer in PATHOLOGICAL_ANSWERS]
  responses += [_response("7"), _response(r"\frac{14}{2}")]
  timeout_s = 0.5
  with rewards.RewardPool(
    task.reward, num_workers=2, timeout_s=timeout_s
  ) as pool:
    start = time.monotonic()
    result = pool.score(responses, ["7"] * len(responses))
    elapsed = time.monotonic() - start
  np.testing.assert_array_equal(
    result.rewards, [0.0] * len(PATHOLOGICAL_ANSWERS) + [1.0, 1.0]
  )
  # Each is counted: the power towers and factorials outlive the pool's limit
  # (or the grader's own) and the oversized answers are rejected unparsed.
  assert result.num_rejected >= 3  # The last three at least.
  assert result.num_failed == len(PATHOLOGICAL_ANSWERS)
  assert elapsed < len(PATHOLOGICAL_ANSWERS) * (timeout_s + 1)


def test_cheap_guards_reject_oversized_answers_quickly():
  start = time.monotonic()
  for answer in PATHOLOGICAL_ANSWERS[3:]:
    assert not math_task.answers_match(answer, "1")
  assert time.monotonic() - start < 1.0


def test_cpu_time_limit_counts_cpu_time_not_wall_time():
  start = time.thread_time()
  with cpu_time.cpu_time_limit(0.05):
    time.sleep(0.2)  # Past the limit in wall time, not in CPU time.
  with pytest.raises(cpu_time.CpuTimeExceeded):
    with cpu_time.cpu_time_limit(0.05):
      while True:
        pass
  assert 0.05 <= time.thread_time() - start < 0.5


def test_cpu_time_limit_counts_only_its_own_thread():
  """Another thread burns several times the limit of the process's CPU
  time while the limited block sleeps: the block ends normally, with its
  own thread's CPU time under the limit. (A limit on the process's CPU
  time would raise CpuTimeExceeded here.)"""
  stop = threading.Event()

  def burn():
    while not stop.is_set():
      pass

  other = threading.Thread(target=burn)
  process_start, thread_start = time.process_time(), time.thread_time()
  other.start()
  try:
    with cpu_time.cpu_time_limit(0.05):
      # Asleep while the other thread uses the process's CPU: 0.2 s of it,
      # whatever the machine's load (within 10 s).
      deadline = time.monotonic() + 10
      while (
        time.process_time() - process_start < 0.2
        and time.monotonic() < deadline
      ):
        time.sleep(0.01)
    ended = True
  except cpu_time.CpuTimeExceeded:
    ended = False
  finally:
    stop.set()
    other.join()
  assert ended, "the other thread's CPU time counted against the limit"
  process_used = time.process_time() - process_start
  assert process_used >= 0.2, process_used  # Four times the limit.
  assert time.thread_time() - thread_start < 0.05


def test_cpu_time_limit_refuses_other_threads():
  errors = []

  def enter():
    try:
      with cpu_time.cpu_time_limit(1):
        pass
    except ValueError as e:
      errors.append(str(e))

  thread = threading.Thread(target=enter)
  thread.start()
  thread.join()
  assert len(errors) == 1 and "main thread" in errors[0]


def test_grading_over_the_cpu_budget_is_rejected():
  task = math_task.MathTask(grading_cpu_s=0.05)
  with pytest.raises(base.Rejected, match="0.05 s of CPU time"):
    task.reward(_response(r"2^{2^{2^{2^{2^{2}}}}}"), "7")


# Grades sys.argv[1] against sys.argv[2] in a fresh process (so that the
# LaTeX parser is as cold as in a new worker) once told its CPU budget.
_GRADE_WHEN_TOLD = """
import sys, time
from score_jax.tasks import base, math
task = math.MathTask()
print("ready", flush=True)
task.grading_cpu_s = float(sys.stdin.readline())
cpu, wall = time.process_time(), time.perf_counter()
try:
  reward = task.reward(sys.argv[1], sys.argv[2])
except base.Rejected:
  reward = -1.0
print(reward, time.process_time() - cpu, time.perf_counter() - wall,
      flush=True)
"""


def _grade(grader, budget_s):
  """Has a `_GRADE_WHEN_TOLD` process grade: its reward, CPU and wall time."""
  grader.stdin.write(f"{budget_s}\n")
  grader.stdin.flush()
  return tuple(map(float, grader.stdout.readline().split()))


def test_reward_under_load_is_the_reward_unloaded():
  response, reference = REWARD_CASES[-1][:2]
  graders = [
    subprocess.Popen(
      [sys.executable, "-c", _GRADE_WHEN_TOLD, response, reference],
      cwd=pathlib.Path(__file__).parents[1],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  unloaded, loaded = graders
  busy = []
  try:
    for grader in graders:
      assert grader.stdout.readline() == "ready\n"
    reward, cpu_s, _ = _grade(unloaded, budget_s=100)
    # Tight in CPU time, yet wide enough for the same work again.
    budget_s = 2.5 * cpu_s
    # Four busy loops share one core with the grader: it gets a fifth of it
    # (or less, if the machine is busy too).
    core = max(os.sched_getaffinity(0))
    busy = [
      subprocess.Popen([sys.executable, "-c", "while True: pass"])
      for _ in range(4)
    ]
    for process in busy + [loaded]:
      os.sched_setaffinity(process.pid, {core})
    loaded_reward, _, loaded_wall_s = _grade(loaded, budget_s)
  finally:
    for process in busy + graders:
      process.kill()
      process.wait()
  assert reward == 1.0
  # The load stretched grading past the budget in wall-clock time, so a
  # wall-clock limit would have rejected it.
  assert loaded_wall_s > budget_s, (loaded_wall_s, budget_s)
  assert loaded_reward == reward
