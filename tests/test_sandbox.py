"""The sandbox against hostile programs, on every backend this machine has.

Each hostile program is paired with tests that pass only if its attack worked
(or that a wrong solution fails), so "scores 0" means the attack failed; where
the attack targets the machine, the test also checks the machine directly.
"""

import os
import pathlib
import secrets
import socket
import time

import pytest

from score_jax.tasks import sandbox

FAST = sandbox.Limits(timeout_s=1.5)


def run(solution, tests, backend, limits=FAST):
  return sandbox.run_tests(solution, tests, limits, backend)


def require(backend, guarantee):
  if not getattr(sandbox.isolation(backend), guarantee):
    pytest.skip(f"the {backend} backend here gives no {guarantee} isolation")


@pytest.fixture(params=sandbox.BACKENDS)
def backend(request):
  problem = sandbox.backend_problem(request.param)
  if (
    problem
    and request.param == "bwrap"
    and os.environ.get("SCORE_JAX_REQUIRE_BWRAP")
  ):
    # CI (.ci/run) installs bubblewrap: the backend TPU workers run.
    pytest.fail(f"the bwrap backend does not work here: {problem}")
  if problem:
    pytest.skip(f"the {request.param} backend does not work here: {problem}")
  return request.param


def test_some_backend_is_available_and_active():
  available = sandbox.available_backends()
  assert available and available[-1] == "rlimits"
  assert sandbox.active_backend() == available[0]
  for backend in sandbox.BACKENDS:
    problem = sandbox.backend_problem(backend)
    assert (problem is None) == (backend in available)
    assert problem is None or (problem and "\n" not in problem)
  assert sandbox.isolation("namespaces").full
  assert not sandbox.isolation("rlimits").full


def test_correct_program_passes_and_wrong_one_fails(backend):
  solution = "def add(a, b):\n  return a + b\nprint('hello')\n"
  passed = run(solution, "assert add(2, 3) == 5\n", backend)
  assert passed.status == "passed" and passed.passed
  assert "hello" in passed.output
  failed = run(solution, "assert add(2, 3) == 6\n", backend)
  assert failed.status == "failed" and not failed.passed
  assert "AssertionError" in failed.output


def test_syntax_error_and_exception_fail(backend):
  assert run("def f(:\n", "pass\n", backend).status == "failed"
  assert run("raise ValueError('no')\n", "pass\n", backend).status == "failed"


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match="Unknown sandbox backend"):
    sandbox.run_tests("", "", backend="docker")


def test_infinite_loop_times_out_promptly(backend):
  result = run(
    "while True:\n  pass\n", "pass\n", backend, sandbox.Limits(timeout_s=0.5)
  )
  assert result.status == "timeout"
  assert result.duration_s < 3.0


def test_huge_allocation_fails(backend):
  result = run("x = bytearray(8 << 30)\n", "pass\n", backend)
  assert result.status == "failed"
  assert "MemoryError" in result.output


def test_writing_past_the_file_size_limit_fails(backend):
  limits = sandbox.Limits(timeout_s=1.5, file_size_mb=1)
  solution = "open('big.bin', 'wb').write(bytes(2 << 20))\n"
  result = run(solution, "pass\n", backend, limits)
  assert result.status == "failed"
  assert "File too large" in result.output or "OSError" in result.output
  assert run(
    "open('small.bin', 'wb').write(bytes(1 << 19))\n", "pass\n", backend, limits
  ).passed


def test_stdout_flood_is_capped(backend):
  limits = sandbox.Limits(timeout_s=1.0, output_bytes=4096)
  flood = run("while True:\n  print('x' * 10000)\n", "pass\n", backend, limits)
  assert flood.status == "timeout"
  assert len(flood.output) < 4096 + 2048
  # A finite flood still passes: the verdict does not depend on the output.
  big = run(
    "import sys\nsys.stdout.write('y' * (20 << 20))\n",
    "pass\n",
    backend,
    sandbox.Limits(timeout_s=5.0, output_bytes=4096),
  )
  assert big.status == "passed"
  assert len(big.output) < 4096 + 2048


@pytest.mark.parametrize(
  "exit_call",
  [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "import os\nos.close(1)\nos.close(2)",
  ],
)
def test_exiting_before_the_tests_fails(backend, exit_call):
  solution = f"def f():\n  return 0\n{exit_call}\n"
  assert run(solution, "assert f() == 1\n", backend).status == "failed"


@pytest.mark.parametrize(
  "attack",
  [
    # Redefine the test helper: the tests' own definition wins.
    "def check(candidate):\n  pass\n",
    # Patch builtins the tests use: the tests get a private snapshot.
    "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 3",
    # Return an object that equals everything.
    "class Yes:\n  __eq__ = lambda s, o: True\n  __bool__ = lambda s: True\n"
    "  __sub__ = lambda s, o: 0\n"
    "def f():\n  return [Yes()]\n"
    "f.__module__ = 'math'\n",
    # Print something that looks like a verdict.
    "print('\\n' + '0' * 32 + '\\nPASSED\\nok')",
    # Read the nonce from stdin (the harness has consumed and closed it).
    "import sys, os\nprint(sys.stdin.read())\nprint(os.read(0, 100))",
    # Walk the frames to the harness's locals.
    "import sys\nframe = sys._getframe()\nwhile frame:\n"
    "  print(frame.f_locals)\n  frame = frame.f_back\nsys.exit(0)",
    "try:\n  raise ValueError\nexcept ValueError as e:\n"
    "  frame = e.__traceback__.tb_frame\n"
    "  while frame:\n    print(frame.f_locals)\n    frame = frame.f_back\n",
    "import signal\nsignal.signal(signal.SIGALRM, lambda n, f: print(f))",
    "import gc\nprint([o for o in gc.get_objects() if isinstance(o, dict)])",
    "print(open('/proc/self/mem', 'rb'))",
    "import ctypes\nctypes.string_at(id(1), 64)",
    # Switch the harness's protections off through its module.
    "import sys\nm = sys.modules['__main__']\n"
    "for name in dir(m):\n  obj = getattr(m, name)\n"
    "  if isinstance(obj, frozenset):\n    setattr(m, name, frozenset())\n"
    "m._make_test_namespace_builder = lambda: (lambda ns, b: ns)\n"
    "frame = sys._getframe(1)\nprint(frame.f_locals)\n",
  ],
)
def test_faking_a_pass_fails(backend, attack):
  # f is wrong (or returns a fake), so only a forged verdict could pass.
  solution = f"def f():\n  return [0]\n{attack}\n"
  tests = (
    "def check(candidate):\n  assert candidate() == [1]\n"
    "  assert abs(len(candidate()) - 3) < 1\n"
    "check(f)\n"
  )
  result = run(solution, tests, backend)
  assert result.status == "failed", result.output


def test_plain_data_from_the_solution_is_accepted(backend):
  solution = (
    "from collections import defaultdict\n"
    "def f():\n  return [(1, 'a'), {2: {3.0}}, None, b'x', "
    "frozenset({True})]\n"
  )
  tests = (
    "assert f() == [(1, 'a'), {2: {3.0}}, None, b'x', frozenset({True})]\n"
  )
  assert run(solution, tests, backend).status == "passed"


def test_files_outside_the_working_directory_are_out_of_reach(
  backend, tmp_path
):
  require(backend, "filesystem")
  sentinel_dir = tmp_path / "sentinel"
  sentinel_dir.mkdir()
  sentinel = sentinel_dir / "keep.txt"
  sentinel.write_text("original")
  token = secrets.token_hex(8)
  elsewhere = [
    pathlib.Path.home() / f"pwned_{token}",
    pathlib.Path("/tmp") / f"pwned_{token}",
    pathlib.Path(__file__).parent / f"pwned_{token}",
  ]
  solution = f"""
import os, shutil
attempts = [
    lambda: os.remove({str(sentinel)!r}),
    lambda: open({str(sentinel)!r}, 'w').write('changed'),
    lambda: shutil.rmtree({str(sentinel_dir)!r}),
    lambda: print(open({str(sentinel)!r}).read()),
] + [lambda p=p: open(p, 'w').write('x') for p in {[str(p) for p in elsewhere]!r}]
succeeded = []
for attempt in attempts:
  try:
    attempt()
    succeeded.append(True)
  except Exception:
    succeeded.append(False)
open('scratch.txt', 'w').write('the working directory is writable')
"""
  tests = "assert any(succeeded)\n"
  result = run(solution, tests, backend)
  assert result.status == "failed", result.output
  assert sentinel.read_text() == "original"
  assert sorted(sentinel_dir.iterdir()) == [sentinel]
  for path in elsewhere:
    assert not path.exists()
  # The working directory was writable, then removed.
  assert run(
    "open('a.txt', 'w').write('x')\n",
    "assert open('a.txt').read() == 'x'\n",
    backend,
  ).passed


def _listener_gets_no_connection(solution_of_port, backend):
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    result = run(solution_of_port(listener.getsockname()[1]), "pass\n", backend)
    with pytest.raises(socket.timeout):
      listener.accept()
  return result


def test_the_programs_own_sockets_are_refused(backend):
  """On every backend, "rlimits" included: the audit hook."""
  result = _listener_gets_no_connection(
    lambda port: (
      f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 1)\n"
    ),
    backend,
  )
  assert result.status == "failed"


def test_network_is_unreachable(backend):
  """Where the backend isolates the network, a program it starts (outside
  the audit hook) cannot connect either."""
  require(backend, "network")
  connect = "import socket; socket.create_connection(('127.0.0.1', {}), 1)"
  _listener_gets_no_connection(
    lambda port: (
      "import subprocess, sys\n"
      f"subprocess.run([sys.executable, '-c', "
      f"{connect.format(port)!r}], timeout=1.2)\n"
    ),
    backend,
  )


@pytest.mark.parametrize(
  "attack",
  [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "os.kill(PYTEST_PID, signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
  ],
)
def test_killing_the_parent_fails(backend, attack):
  require(backend, "processes")
  # The pid is filled in here, not in the ids, so that pytest-xdist workers
  # collect the same tests.
  attack = attack.replace("PYTEST_PID", str(os.getpid()))
  solution = (
    f"import os, signal\ntry:\n  {attack}\nexcept OSError:\n"
    "  pass\ndef f():\n  return 0\n"
  )
  assert run(solution, "assert f() == 1\n", backend).status == "failed"
  # Pytest is alive (we are here) and the sandbox still works.
  assert run("x = 1\n", "assert x == 1\n", backend).passed


def test_fork_bomb_is_contained(backend):
  require(backend, "processes")
  solution = (
    "import os\n"
    "while True:\n"
    "  try:\n    os.fork()\n  except OSError:\n    pass\n"
  )
  start = time.monotonic()
  result = run(solution, "pass\n", backend, sandbox.Limits(timeout_s=1.0))
  assert result.status == "timeout"
  # Killed promptly after its 1 s limit. Generous, because tearing down
  # thousands of processes took 6 s on a 2-core machine under full load; an
  # uncontained bomb never returns at all.
  assert time.monotonic() - start < 15.0
  # Everything it started is gone: a new program runs normally and promptly.
  assert run(
    "import os\npid = os.fork()\nif pid == 0:\n  os._exit(0)\n"
    "os.waitpid(pid, 0)\n",
    "pass\n",
    backend,
  ).passed


def _processes_with(token):
  """Pids of this machine's processes whose command line holds `token`
  (the host's /proc also lists the processes of every pid namespace)."""
  pids = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
        if token.encode() in cmdline.read():
          pids.append(int(entry))
    except (OSError, ValueError):
      pass  # Not a process, or one that just exited.
  return pids


@pytest.mark.parametrize(
  "double_fork, times_out",
  [(False, False), (True, False), (True, True)],
  ids=["setsid", "double_fork", "double_fork_then_timeout"],
)
def test_a_daemon_that_outlives_its_parent_is_gone_after_grading(
  backend, double_fork, times_out
):
  """On every backend: a process that left the program's session (setsid)
  and, with a double fork, lost its parent too, is killed with the rest of
  the program's process tree before the verdict comes back, whether the
  program ended or was killed at its time limit."""
  token = secrets.token_hex(8)
  daemon = (
    "import os, sys, time; os.write(int(sys.argv[1]), b'up'); time.sleep(60)"
  )
  solution = f"""
import os, sys
ready_r, ready_w = os.pipe()
if os.fork() == 0:
  os.setsid()
  if {double_fork} and os.fork():
    os._exit(0)
  os.set_inheritable(ready_w, True)
  # A fresh interpreter, whose command line carries the token.
  os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', {daemon!r},
                            str(ready_w), {token!r}])
os.close(ready_w)
started = os.read(ready_r, 2)
print('the daemon says', started, flush=True)
while {times_out}:
  pass
"""
  result = run(
    solution,
    "assert started == b'up'\n",
    backend,
    sandbox.Limits(timeout_s=2.0 if times_out else 5.0),
  )
  # The daemon was running when the program ended...
  assert "the daemon says b'up'" in result.output, result.output
  assert result.status == ("timeout" if times_out else "passed")
  # ...and is gone now: the verdict comes after the cleanup.
  assert _processes_with(token) == []
