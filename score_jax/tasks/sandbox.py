"""Runs an untrusted Python solution against its unit tests, isolated.

`run_tests(solution, tests)` executes `solution` and then `tests` in a fresh
process and reports `passed` only if the tests ran to their end. It never
raises for anything the program does. This module is the parent's side: it
starts the containers, feeds them programs, enforces the wall clock and reads
the verdict; what runs inside a container (its init and the harness in each
program's process, which makes the verdict unfakeable) is
`tasks/sandbox_harness.py`.

Isolation backends (`available_backends()`, `active_backend()`; the first
available of this order is the default):
  * "bwrap" (bubblewrap installed and working; unprivileged, it needs user
    namespaces): one bwrap container per calling process with its own user,
    pid, network, ipc, uts, cgroup and mount namespaces; the filesystem is
    an empty read-only tmpfs with read-only binds of /usr, /bin, /lib*,
    /sbin and the Python installation, a fresh /proc, a minimal /dev and a
    private size-limited tmpfs /sandbox; it runs as uid 65534 without
    capabilities and dies with its parent. No network at all (only a down
    loopback). The user's files (home, /etc, /tmp, the repository) do not
    exist inside.
  * "namespaces" (running as root, unshare(2) permitted): the same shape built
    directly with unshare/mount/pivot_root: mount, pid, network, ipc and uts
    namespaces; a read-only tmpfs root with read-only binds of the system
    directories and the Python installation, a fresh /proc, /dev/{null,zero,
    full,random,urandom}, a size-limited tmpfs /sandbox; programs run under
    an unprivileged uid unique to the container.
  * "rlimits" (anything else) isolates nothing: no namespaces. When root and
    the Python installation is readable by others, programs run under an
    unprivileged uid unique to the process, so files not world-writable
    cannot be changed; otherwise they run as the caller and can read,
    change and delete the caller's files. No network namespace: the audit
    hook refuses the program's own sockets, but not those of a program it
    starts. Code rewards refuse it unless told otherwise (`tasks/code.py`).
In every backend a container process forks one child per program (cheap: the
interpreter and common modules are already loaded); the child gets a fresh
empty working directory (removed afterwards), its own session, and rlimits:
CPU seconds, address space, file size, open files, and process count
(effective for the unprivileged uids above; root is exempt from it). The
parent enforces the wall-clock limit; on timeout or exit the program's whole
process tree is killed and reaped before the next program starts, daemons
that called setsid or double-forked included: in the containers every
process of the pid namespace but its init, in "rlimits" every descendant of
the container process, a child subreaper that the program's orphans
re-parent to. Output is read with a cap, so a flood cannot exhaust the
parent's memory. A process runs one program at a time (calls from several
threads queue); score in parallel with worker processes (`tasks/rewards.py`),
each of which starts its own container on first use (about 0.15 s).
"""

import dataclasses
import json
import os
import platform
import secrets
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from score_jax.tasks import sandbox_harness as harness

BACKENDS = ("bwrap", "namespaces", "rlimits")

_BWRAP_UID = 65534
_LAUNCHER_PATH = "/run/score_jax_sandbox.py"
_START_TIMEOUT_S = 30.0
_REPLY_TIMEOUT_S = 5.0
_TAIL_BYTES = 1024
_PROBLEM_CHARS = 300


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits."""

  timeout_s: float = 3.0  # Wall clock; CPU seconds are capped just above it.
  memory_mb: int = 1024  # Address space.
  file_size_mb: int = 16
  max_processes: int = 32  # Threads count too.
  max_open_files: int = 256
  output_bytes: int = 64 << 10  # Captured output kept (head and tail).


@dataclasses.dataclass(frozen=True)
class Result:
  """How one program ended. `status`: passed, failed, timeout or error
  (the sandbox itself could not run the program)."""

  status: str
  output: str
  backend: str
  duration_s: float

  @property
  def passed(self) -> bool:
    """Whether the tests ran to their end."""
    return self.status == "passed"


def run_tests(
  solution: str,
  tests: str,
  limits: Limits = Limits(),
  backend: Optional[str] = None,
) -> Result:
  """Runs `solution` then `tests` in one fresh process of the sandbox;
  passes iff `tests` runs to its end. Never raises for anything the program
  does.

  Args:
    solution: the program's Python source.
    tests: Python source run after it in the same process (asserts).
    limits: the program's wall-clock and resource limits.
    backend: one of `BACKENDS`; None: `active_backend()`.

  Returns:
    How the program ended, its captured output and how long it took.

  Raises:
    ValueError: for an unknown backend.
    RuntimeError: if `backend` is None and no backend works here.
  """
  backend = backend or active_backend()
  if backend not in BACKENDS:
    raise ValueError(
      f"Unknown sandbox backend {backend!r}; use one of {BACKENDS}."
    )
  start = time.monotonic()
  try:
    status, output = _container(backend).run(solution, tests, limits)
  except _SandboxError as e:
    status, output = "error", str(e)
  return Result(status, output, backend, time.monotonic() - start)


@dataclasses.dataclass(frozen=True)
class Isolation:
  """What a backend guarantees beyond the rlimits and the wall clock."""

  # Files outside the working directory can be neither read nor changed.
  filesystem: bool
  # No connection can be made, not even to localhost.
  network: bool
  # The program cannot signal processes outside itself, and its process
  # count is capped.
  processes: bool

  @property
  def full(self) -> bool:
    """All three: what model-written code needs."""
    return self.filesystem and self.network and self.processes


def isolation(backend: str) -> Isolation:
  """The guarantees of `backend` on this machine (see the module docstring)."""
  if backend == "rlimits":
    return Isolation(False, False, _private_uid(backend) is not None)
  return Isolation(True, True, True)


def available_backends() -> tuple[str, ...]:
  """The backends that start and run a trivial program on this machine."""
  return tuple(b for b in BACKENDS if backend_problem(b) is None)


def active_backend() -> str:
  """The backend `run_tests` uses by default: the first available one."""
  available = available_backends()
  if not available:
    raise RuntimeError(
      "No sandbox backend works here: the sandbox needs "
      "Linux (pidfd_open, Linux 5.3 or later)."
    )
  return available[0]


def backend_problem(backend: str) -> Optional[str]:
  """Why `backend` does not work on this machine, or None if it does."""
  if backend not in BACKENDS:
    raise ValueError(
      f"Unknown sandbox backend {backend!r}; use one of {BACKENDS}."
    )
  if backend not in _problems:
    _problems[backend] = _probe(backend)
  return _problems[backend]


def how_to_isolate() -> str:
  """What would make an isolating backend work here, for error messages."""
  if not shutil.which("bwrap"):
    return "install bubblewrap (apt-get install bubblewrap)"
  return (
    f"bubblewrap is installed but fails ({backend_problem('bwrap')}): "
    "enable unprivileged user namespaces (on Ubuntu 24.04: sysctl -w "
    "kernel.apparmor_restrict_unprivileged_userns=0)"
  )


class _SandboxError(Exception):
  """The sandbox (not the program) failed."""


_problems: dict[str, Optional[str]] = {}
_containers: dict[tuple[int, str], "_Container"] = {}
_lock = threading.Lock()


def _probe(backend: str) -> Optional[str]:
  if backend == "bwrap" and not shutil.which("bwrap"):
    return "bubblewrap is not installed"
  if backend == "namespaces" and os.geteuid() != 0:
    return "it needs root"
  if backend == "namespaces" and harness.pivot_root_syscall() is None:
    return f"no pivot_root system call number for {platform.machine()}"
  try:
    status, output = _container(backend).run("", "", Limits())
  except (_SandboxError, OSError) as e:
    return _one_line(str(e))
  if status != "passed":
    return _one_line(f"an empty program {status}: {output}")
  return None


def _one_line(text: str) -> str:
  """A failure on one line: its first, and of a traceback its last, line."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) > 2:
    lines = [lines[0], "...", lines[-1]]
  return " ".join(lines)[:_PROBLEM_CHARS]


def _container(backend: str) -> "_Container":
  """This process's container for `backend` (forked children get their own)."""
  key = (os.getpid(), backend)
  with _lock:
    container = _containers.get(key)
    if container is None or not container.alive():
      container = _containers[key] = _Container(backend)
    return container


class _Container:
  """A sandbox container process that forks one child per program."""

  def __init__(self, backend: str):
    self.backend = backend
    self._lock = threading.Lock()
    parent_sock, child_sock = socket.socketpair(
      socket.AF_UNIX, socket.SOCK_SEQPACKET
    )
    self._sock = parent_sock
    self._stderr = tempfile.TemporaryFile()
    command = _container_command(backend, child_sock.fileno())
    self._process = subprocess.Popen(
      command,
      pass_fds=[child_sock.fileno()],
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=self._stderr,
      start_new_session=True,
      env=_container_env(),
    )
    child_sock.close()
    if self._receive(_START_TIMEOUT_S) != {"ready": True}:
      self.close()
      raise _SandboxError(
        f"{backend} sandbox did not start: {self._stderr_text()}"
      )

  def alive(self) -> bool:
    return self._process.poll() is None

  def close(self) -> None:
    try:
      os.killpg(self._process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self._process.wait()
    self._sock.close()

  def run(self, solution: str, tests: str, limits: Limits) -> tuple[str, str]:
    nonce = secrets.token_hex(16)
    payload = json.dumps(
      {"nonce": nonce, "solution": solution, "tests": tests}
    ).encode()
    with self._lock:
      stdin_r, stdin_w = os.pipe()
      stdout_r, stdout_w = os.pipe()
      try:
        socket.send_fds(
          self._sock,
          [json.dumps(dataclasses.asdict(limits)).encode()],
          [stdin_r, stdout_w],
        )
      except OSError as e:
        raise _SandboxError(f"{self.backend} sandbox is gone: {e}") from e
      finally:
        os.close(stdin_r)
        os.close(stdout_w)
      output = _Output(limits.output_bytes)
      timed_out, reply = self._exchange(
        stdin_w, stdout_r, payload, output, limits.timeout_s
      )
    if reply.get("error"):
      return "error", f"sandbox setup failed: {reply['error']}"
    if output.contains(f"\n{nonce}\n".encode()):
      return "passed", output.text().replace(f"\n{nonce}\n", "\n")
    return ("timeout" if timed_out else "failed"), output.text()

  def _exchange(
    self,
    stdin_w: int,
    stdout_r: int,
    payload: bytes,
    output: "_Output",
    timeout_s: float,
  ) -> tuple[bool, dict]:
    """Feeds stdin, reads output and waits for the container's report."""
    deadline = time.monotonic() + timeout_s
    timed_out = False
    reply = None
    os.set_blocking(stdin_w, False)
    selector = selectors.DefaultSelector()
    selector.register(stdin_w, selectors.EVENT_WRITE)
    selector.register(stdout_r, selectors.EVENT_READ)
    selector.register(self._sock, selectors.EVENT_READ)
    try:
      while stdout_r in _registered(selector) or reply is None:
        if reply is not None:
          # The program is dead; whatever still holds its stdout gets a moment.
          deadline = min(deadline, time.monotonic() + 0.2)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          if reply is not None:
            break
          timed_out = True
          self._sock.send(b"kill")
          reply = self._receive(_REPLY_TIMEOUT_S)
          if reply is None:
            self.close()
            raise _SandboxError(f"{self.backend} sandbox stopped answering.")
          continue
        for key, _ in selector.select(remaining):
          if key.fd == stdin_w:
            try:
              payload = payload[os.write(stdin_w, payload) :]
            except BrokenPipeError:
              payload = b""
            if not payload:
              selector.unregister(stdin_w)
              os.close(stdin_w)
              stdin_w = -1
          elif key.fd == stdout_r:
            chunk = os.read(stdout_r, 1 << 16)
            if chunk:
              output.add(chunk)
            else:
              selector.unregister(stdout_r)
          else:
            reply = self._receive(0)
            if reply is None:
              self.close()
              raise _SandboxError(
                f"{self.backend} sandbox died: {self._stderr_text()}"
              )
            selector.unregister(self._sock)
    finally:
      selector.close()
      os.close(stdout_r)
      if stdin_w >= 0:
        os.close(stdin_w)
    return timed_out, reply

  def _receive(self, timeout_s: float) -> Optional[dict]:
    self._sock.settimeout(timeout_s)
    try:
      message = self._sock.recv(1 << 16)
    except (socket.timeout, OSError):
      return None
    finally:
      self._sock.settimeout(None)
    return json.loads(message) if message else None

  def _stderr_text(self) -> str:
    self._stderr.seek(0)
    return self._stderr.read(2000).decode(errors="replace").strip()


def _registered(selector: selectors.BaseSelector) -> set[int]:
  return {key.fd for key in selector.get_map().values()}


class _Output:
  """The first `limit` bytes of a stream and its last `_TAIL_BYTES`."""

  def __init__(self, limit: int):
    self._limit = limit
    self._head = bytearray()
    self._tail = bytearray()
    self._dropped = 0

  def add(self, chunk: bytes) -> None:
    room = self._limit - len(self._head)
    self._head += chunk[: max(room, 0)]
    rest = chunk[max(room, 0) :]
    if rest:
      self._tail += rest
      excess = len(self._tail) - _TAIL_BYTES
      if excess > 0:
        self._dropped += excess
        del self._tail[:excess]

  def contains(self, marker: bytes) -> bool:
    return marker in self._head + self._tail

  def text(self) -> str:
    data = bytes(self._head)
    if self._dropped:
      data += f"\n[... {self._dropped} bytes dropped ...]\n".encode()
    return (data + self._tail).decode(errors="replace")


def _container_env() -> dict:
  return {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": harness.SCRATCH,
    "PYTHONDONTWRITEBYTECODE": "1",
  }


def _container_command(backend: str, sock_fd: int) -> list[str]:
  python = os.path.realpath(sys.executable)
  launcher = os.path.realpath(harness.__file__)
  if backend == "bwrap":
    config = {"scratch": harness.SCRATCH, "uid": None}
    command = [
      "bwrap",
      "--unshare-all",
      "--unshare-user",
      "--uid",
      str(_BWRAP_UID),
      "--gid",
      str(_BWRAP_UID),
      "--die-with-parent",
      "--new-session",
      "--as-pid-1",
    ]
    for path in harness.SYSTEM_DIRS:
      if os.path.islink(path):
        command += ["--symlink", os.readlink(path), path]
      elif os.path.isdir(path):
        command += ["--ro-bind", path, path]
    for path in harness.python_dirs():
      command += ["--ro-bind", path, path]
    command += [
      "--ro-bind",
      launcher,
      _LAUNCHER_PATH,
      "--proc",
      "/proc",
      "--dev",
      "/dev",
      "--size",
      str(harness.SCRATCH_BYTES),
      "--tmpfs",
      harness.SCRATCH,
      "--chdir",
      harness.SCRATCH,
      "--remount-ro",
      "/",
      python,
      "-I",
      _LAUNCHER_PATH,
      "serve",
    ]
  else:
    config = {"scratch": None, "uid": _private_uid(backend)}
    command = [python, "-I", launcher, backend]
  return command + [str(sock_fd), json.dumps(config)]


def _private_uid(backend: str) -> Optional[int]:
  """An unprivileged uid for this process's programs, or None to keep ours."""
  if os.geteuid() != 0:
    return None
  if backend == "rlimits" and not _readable_by_others(harness.python_dirs()):
    return None
  return 0x40000000 + os.getpid()


def _readable_by_others(paths: list[str]) -> bool:
  for path in paths:
    while True:
      mode = os.stat(path).st_mode
      if not mode & stat.S_IXOTH or not mode & stat.S_IROTH:
        return False
      if path == os.path.dirname(path):
        break
      path = os.path.dirname(path)
  return True
