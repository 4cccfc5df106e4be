"""Runs an untrusted Python solution against its unit tests, isolated.

`run_tests(solution, tests)` executes `solution` and then `tests` in a fresh
process and reports `passed` only if the tests ran to their end. It never
raises for anything the program does.

Verdict (not fakeable by printing or exiting): the parent draws a random nonce
per run and sends it, with the solution and the tests, through the program's
stdin. A trusted harness reads all of stdin, closes it, and keeps the nonce and
the tests only in its own locals. It runs the solution in one namespace, then
the tests in a copy of that namespace with a private snapshot of the builtins
(so the solution cannot redefine the test helpers, `print` or `abs` for the
tests), and writes the nonce after the last test statement returned. The
parent counts a pass only if the nonce arrives. `sys.exit`, `os._exit`,
exceptions, killing the harness or closing stdout all score 0. Values returned
by functions the solution defines must be plain data (no instance of a class
written in Python, so an object whose `__eq__` always says True scores 0). An
audit hook (which Python code cannot remove) refuses the ways to read the
harness's locals: frame and traceback-frame access, `sys._getframe`, tracing,
`gc` object walks, `ctypes` and opening anything under /proc; it also
refuses the program's own sockets (connect, bind, send). The signal module
(whose handlers receive frames) is disabled. This is defence in depth
inside one interpreter, not a security boundary: the OS isolation below is.
Known gaps: a solution that monkeypatches a stdlib module the tests call
(e.g. `math.isclose`) can sway those tests, and a determined one could rebuild
a module the harness disabled through importlib internals.

Isolation backends (`available_backends()`, `active_backend()`; the first
available of this order is the default):
  * "bwrap" (bubblewrap installed and working): one bwrap container per
    calling process with its own user, pid, network, ipc, uts, cgroup and
    mount namespaces; the filesystem is an empty read-only tmpfs with
    read-only binds of /usr, /bin, /lib*, /sbin and the Python installation,
    a fresh /proc, a minimal /dev and a private size-limited tmpfs /sandbox;
    it runs as uid 65534 without capabilities and dies with its parent. No
    network at all (only a down loopback). The user's files (home, /etc,
    /tmp, the repository) do not exist inside.
  * "namespaces" (running as root, unshare(2) permitted): the same shape built
    directly with unshare/mount/pivot_root: mount, pid, network, ipc and uts
    namespaces; a read-only tmpfs root with read-only binds of the system
    directories and the Python installation, a fresh /proc, /dev/{null,zero,
    full,random,urandom}, a size-limited tmpfs /sandbox; programs run under
    an unprivileged uid unique to the container.
  * "rlimits" (anything else): no namespaces. When root and the Python
    installation is readable by others, programs run under an unprivileged
    uid unique to the process, so files not world-writable cannot be
    changed; otherwise they run as the caller and can touch the caller's
    files: only the limits below apply. No network namespace: the audit
    hook refuses the program's own sockets, but not those of a program it
    starts.
In every backend a container process forks one child per program (cheap: the
interpreter and common modules are already loaded); the child gets a fresh
empty working directory (removed afterwards), its own session, and rlimits:
CPU seconds, address space, file size, open files, and process count
(effective for the unprivileged uids above; root is exempt from it). The
parent enforces the wall-clock limit; on timeout or exit the whole program is
killed: in the containers every process but the container's init (pid 1
kills -1 and reaps until its namespace is empty), in "rlimits" its process
group and, when it runs under its own uid, every process of that uid. Output
is read with a cap, so a flood cannot exhaust the parent's memory. A process
runs one program at a time (calls from several threads queue); score in
parallel with worker processes (`tasks/rewards.py`), each of which starts its
own container on first use (about 0.15 s).
"""

import ctypes
import dataclasses
import json
import os
import platform
import resource
import secrets
import select
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

BACKENDS = ("bwrap", "namespaces", "rlimits")

# Modules loaded in the container before forking programs: what HumanEval and
# MBPP solutions import, so a program does not pay for their import.
_PRELOADED_MODULES = (
    "bisect", "cmath", "collections", "copy", "dataclasses", "datetime",
    "decimal", "fractions", "functools", "hashlib", "heapq", "itertools",
    "json", "math", "operator", "random", "re", "statistics", "string",
    "sys", "typing")
# Directories bound read-only into the containers (besides Python's own).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_SCRATCH = "/sandbox"
_SCRATCH_BYTES = 64 << 20
_BWRAP_UID = 65534
_LAUNCHER_PATH = "/run/score_jax_sandbox.py"
_START_TIMEOUT_S = 30.0
_REPLY_TIMEOUT_S = 5.0
_TAIL_BYTES = 1024
_SETUP_FAILED = 125


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
    return self.status == "passed"


def run_tests(solution: str, tests: str, limits: Limits = Limits(),
              backend: Optional[str] = None) -> Result:
  """Runs `solution` then `tests`; passes iff `tests` runs to its end."""
  backend = backend or active_backend()
  if backend not in BACKENDS:
    raise ValueError(f"Unknown sandbox backend {backend!r}; use one of "
                     f"{BACKENDS}.")
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


def isolation(backend: str) -> Isolation:
  """The guarantees of `backend` on this machine (see the module docstring)."""
  if backend == "rlimits":
    return Isolation(False, False, _private_uid(backend) is not None)
  return Isolation(True, True, True)


def available_backends() -> tuple[str, ...]:
  """The backends that start and run a trivial program on this machine."""
  return tuple(b for b in BACKENDS if _probe(b))


def active_backend() -> str:
  """The backend `run_tests` uses by default: the first available one."""
  backend = next((b for b in BACKENDS if _probe(b)), None)
  if backend is None:
    raise RuntimeError("No sandbox backend works here: the sandbox needs "
                       "Linux (pidfd_open, Linux 5.3 or later).")
  return backend


class _SandboxError(Exception):
  """The sandbox (not the program) failed."""


_probe_results: dict[str, bool] = {}
_containers: dict[tuple[int, str], "_Container"] = {}
_lock = threading.Lock()


def _probe(backend: str) -> bool:
  if backend not in _probe_results:
    if backend == "bwrap" and not shutil.which("bwrap"):
      works = False
    elif backend == "namespaces" and (os.geteuid() != 0 or
                                      _pivot_root_syscall() is None):
      works = False
    else:
      try:
        works = _container(backend).run("", "", Limits())[0] == "passed"
      except (_SandboxError, OSError):
        works = False
    _probe_results[backend] = works
  return _probe_results[backend]


def _container(backend: str) -> "_Container":
  """This process's container for `backend` (forked children get their own)."""
  key = (os.getpid(), backend)
  with _lock:
    container = _containers.get(key)
    if container is None or not container.alive():
      container = _containers[key] = _Container(backend)
    return container


# ----------------------------------------------------------------------------
# Parent side.


class _Container:
  """A sandbox container process that forks one child per program."""

  def __init__(self, backend: str):
    self.backend = backend
    self._lock = threading.Lock()
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX,
                                                socket.SOCK_SEQPACKET)
    self._sock = parent_sock
    self._stderr = tempfile.TemporaryFile()
    command = _container_command(backend, child_sock.fileno())
    self._process = subprocess.Popen(
        command, pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=self._stderr,
        start_new_session=True, env=_container_env())
    child_sock.close()
    if self._receive(_START_TIMEOUT_S) != {"ready": True}:
      self.close()
      raise _SandboxError(f"{backend} sandbox did not start: "
                          f"{self._stderr_text()}")

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
        {"nonce": nonce, "solution": solution, "tests": tests}).encode()
    with self._lock:
      stdin_r, stdin_w = os.pipe()
      stdout_r, stdout_w = os.pipe()
      try:
        socket.send_fds(self._sock, [json.dumps(
            dataclasses.asdict(limits)).encode()], [stdin_r, stdout_w])
      except OSError as e:
        raise _SandboxError(f"{self.backend} sandbox is gone: {e}") from e
      finally:
        os.close(stdin_r)
        os.close(stdout_w)
      output = _Output(limits.output_bytes)
      timed_out, reply = self._exchange(stdin_w, stdout_r, payload, output,
                                        limits.timeout_s)
    if reply.get("error"):
      return "error", f"sandbox setup failed: {reply['error']}"
    if output.contains(f"\n{nonce}\n".encode()):
      return "passed", output.text().replace(f"\n{nonce}\n", "\n")
    return ("timeout" if timed_out else "failed"), output.text()

  def _exchange(self, stdin_w: int, stdout_r: int, payload: bytes,
                output: "_Output", timeout_s: float) -> tuple[bool, dict]:
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
              payload = payload[os.write(stdin_w, payload):]
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
              raise _SandboxError(f"{self.backend} sandbox died: "
                                  f"{self._stderr_text()}")
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
    self._head += chunk[:max(room, 0)]
    rest = chunk[max(room, 0):]
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


def _python_dirs() -> list[str]:
  """Directories that hold this Python installation."""
  dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
          os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
  return sorted(os.path.realpath(d) for d in dirs)


def _container_env() -> dict:
  return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": _SCRATCH,
          "PYTHONDONTWRITEBYTECODE": "1"}


def _container_command(backend: str, sock_fd: int) -> list[str]:
  python = os.path.realpath(sys.executable)
  launcher = os.path.realpath(__file__)
  if backend == "bwrap":
    config = {"scratch": _SCRATCH, "uid": None}
    command = ["bwrap", "--unshare-all", "--unshare-user",
               "--uid", str(_BWRAP_UID), "--gid", str(_BWRAP_UID),
               "--die-with-parent", "--new-session", "--as-pid-1"]
    for path in _SYSTEM_DIRS:
      if os.path.islink(path):
        command += ["--symlink", os.readlink(path), path]
      elif os.path.isdir(path):
        command += ["--ro-bind", path, path]
    for path in _python_dirs():
      command += ["--ro-bind", path, path]
    command += ["--ro-bind", launcher, _LAUNCHER_PATH, "--proc", "/proc",
                "--dev", "/dev", "--size", str(_SCRATCH_BYTES),
                "--tmpfs", _SCRATCH, "--chdir", _SCRATCH, "--remount-ro", "/",
                python, "-I", _LAUNCHER_PATH, "serve"]
  else:
    config = {"scratch": None, "uid": _private_uid(backend)}
    command = [python, "-I", launcher, backend]
  return command + [str(sock_fd), json.dumps(config)]


def _private_uid(backend: str) -> Optional[int]:
  """An unprivileged uid for this process's programs, or None to keep ours."""
  if os.geteuid() != 0:
    return None
  if backend == "rlimits" and not _readable_by_others(_python_dirs()):
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


# ----------------------------------------------------------------------------
# Container side (runs as `python -I sandbox.py <mode> <fd> <config>`).

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _pivot_root_syscall() -> Optional[int]:
  return {"x86_64": 155, "aarch64": 41}.get(platform.machine())


def _die_with_parent(libc) -> None:
  _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def _enter_namespaces(uid: int) -> None:
  """Moves this process into fresh namespaces with a minimal read-only root.

  Returns in the new pid namespace's init (pid 1), running as `uid`; the
  original process stays outside, waits for it and exits with its status.
  """
  libc = _libc()
  _die_with_parent(libc)
  _check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWIPC |
                      _CLONE_NEWPID | _CLONE_NEWNET), "unshare")
  alive_r, alive_w = os.pipe()
  pid = os.fork()
  if pid:
    os.close(alive_r)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
  _die_with_parent(libc)
  os.close(alive_w)
  os.set_blocking(alive_r, False)
  try:
    if os.read(alive_r, 1) == b"":
      os._exit(1)  # The outer process died before the death signal was set.
  except BlockingIOError:
    pass
  os.close(alive_r)

  def mount(source, target, fstype, flags, data=None):
    _check(libc.mount(_bytes(source), _bytes(target), _bytes(fstype),
                      ctypes.c_ulong(flags), _bytes(data)), f"mount {target}")

  mount(None, "/", None, _MS_REC | _MS_PRIVATE)
  root = "/tmp"
  mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
  read_only = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
  for path in _SYSTEM_DIRS + tuple(_python_dirs()):
    target = root + path
    if os.path.islink(path):
      os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
      os.makedirs(target, exist_ok=True)
      mount(path, target, None, _MS_BIND | _MS_REC)
      mount(None, target, None, read_only)
  os.makedirs(root + os.path.dirname(_LAUNCHER_PATH), exist_ok=True)
  os.mkdir(root + "/dev")
  for device in _DEVICES:
    open(f"{root}/dev/{device}", "w").close()
    mount(f"/dev/{device}", f"{root}/dev/{device}", None, _MS_BIND)
  os.mkdir(root + "/proc")
  mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  os.mkdir(root + _SCRATCH)
  mount("tmpfs", root + _SCRATCH, "tmpfs", _MS_NOSUID | _MS_NODEV,
        f"mode=0700,size={_SCRATCH_BYTES}")
  os.chown(root + _SCRATCH, uid, uid)
  os.chdir(root)
  os.mkdir(".old")
  _check(libc.syscall(_pivot_root_syscall(), b".", b".old"), "pivot_root")
  os.chdir("/")
  _check(libc.umount2(b"/.old", _MNT_DETACH), "umount")
  os.rmdir("/.old")
  mount(None, "/", None, read_only)
  libc.sethostname(b"sandbox", 7)
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)
  os.chdir(_SCRATCH)


def _bytes(value: Optional[str]) -> Optional[bytes]:
  return None if value is None else value.encode()


def _serve(sock_fd: int, config: dict) -> None:
  """The container's loop: one forked child per program request."""
  for name in _PRELOADED_MODULES:
    __import__(name)
  libc = _libc()
  libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
  sock = socket.socket(fileno=sock_fd)
  scratch = config["scratch"] or tempfile.gettempdir()
  sock.send(json.dumps({"ready": True}).encode())
  while True:
    try:
      message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
    except OSError:
      return
    if not message:
      return  # The parent is gone.
    if len(fds) != 2:
      # A kill request that crossed the end of the previous program.
      for fd in fds:
        os.close(fd)
      continue
    limits = Limits(**json.loads(message))
    exit_code, error = _run_child(sock, fds, limits, scratch, config["uid"])
    sock.send(json.dumps({"exit": exit_code, "error": error}).encode())


def _run_child(sock: socket.socket, fds: list[int], limits: Limits,
               scratch: str, uid: Optional[int]) -> tuple[int, Optional[str]]:
  """Forks the program, waits for its end or a kill request, cleans up."""
  workdir = tempfile.mkdtemp(prefix="run-", dir=scratch)
  if uid is not None and os.geteuid() == 0:
    os.chown(workdir, uid, uid)
  error_r, error_w = os.pipe()
  pid = os.fork()
  if pid == 0:
    try:
      os.close(error_r)
      sock.close()
      _enter_child(fds, workdir, limits, uid)
      os.close(error_w)
    except BaseException as e:  # pylint: disable=broad-except
      os.write(error_w, f"{type(e).__name__}: {e}".encode())
      os._exit(_SETUP_FAILED)
    _harness()
  for fd in fds:
    os.close(fd)
  os.close(error_w)
  with os.fdopen(error_r, "rb") as errors:
    error = errors.read().decode(errors="replace") or None
  pidfd = os.pidfd_open(pid)
  ready, _, _ = select.select([pidfd, sock], [], [])
  if sock.fileno() in ready and not sock.recv(16):
    _kill_program(pid, uid)
    os._exit(0)  # The parent is gone.
  _kill_program(pid, uid)
  exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
  os.close(pidfd)
  _reap_orphans()
  shutil.rmtree(workdir, onerror=_force_remove)
  return exit_code, error


def _enter_child(fds: list[int], workdir: str, limits: Limits,
                 uid: Optional[int]) -> None:
  """Turns the forked child into the confined program's process."""
  os.setsid()
  os.dup2(fds[0], 0)
  os.dup2(fds[1], 1)
  os.dup2(fds[1], 2)
  for fd in fds:
    os.close(fd)
  os.chdir(workdir)
  os.environ.update(HOME=workdir, TMPDIR=workdir)
  cpu_s = int(limits.timeout_s) + 1
  for limit, value in ((resource.RLIMIT_CPU, cpu_s),
                       (resource.RLIMIT_AS, limits.memory_mb << 20),
                       (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
                       (resource.RLIMIT_NOFILE, limits.max_open_files),
                       (resource.RLIMIT_NPROC, limits.max_processes),
                       (resource.RLIMIT_CORE, 0)):
    _, hard = resource.getrlimit(limit)
    if hard != resource.RLIM_INFINITY:
      value = min(value, hard)
    resource.setrlimit(limit, (value, value))
  if uid is not None and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
  _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _kill_program(pid: int, uid: Optional[int]) -> None:
  """Kills the program and everything it started."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except OSError:
    pass
  if os.getpid() == 1:
    os.kill(-1, signal.SIGKILL)  # Everything in this pid namespace but us.
  elif uid is not None and uid != os.getuid():
    killer = os.fork()
    if killer == 0:
      try:
        os.setuid(uid)
        os.kill(-1, signal.SIGKILL)  # Every process of the program's uid.
      finally:
        os._exit(0)
    os.waitpid(killer, 0)


def _reap_orphans() -> None:
  """Reaps children re-parented to us (as pid 1 or as the subreaper).

  As pid 1 every process left in the namespace is ours to reap, so we kill
  and wait until none is left: the next program starts in an empty one.
  """
  while True:
    if os.getpid() == 1:
      try:
        os.kill(-1, signal.SIGKILL)
      except ProcessLookupError:
        pass
    try:
      if os.waitpid(-1, 0 if os.getpid() == 1 else os.WNOHANG)[0] == 0:
        return
    except ChildProcessError:
      return


def _force_remove(function, path, _) -> None:
  """Lets rmtree remove what the program made unreadable or unwritable."""
  try:
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
      os.chmod(path, 0o700)
      shutil.rmtree(path, ignore_errors=True)
    else:
      function(path)
  except OSError:
    pass


# ----------------------------------------------------------------------------
# Harness (runs in the program's process). The solution can reach this module
# (sys.modules["__main__"]) and the real builtins, so everything the harness
# uses after the solution started is captured in closures beforehand.

_DENIED_EVENTS = frozenset((
    "sys._getframe", "sys._current_frames", "sys._current_exceptions",
    "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents",
    # The program's own sockets, on every backend (the only network guard of
    # "rlimits"; a program it starts runs without this hook).
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"))
_DENIED_ATTRIBUTES = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
_PLAIN_TYPES = frozenset((type(None), bool, int, float, complex, str, bytes))
_CONTAINER_TYPES = frozenset((list, tuple, set, frozenset, dict))
_Py_TPFLAGS_IMMUTABLETYPE = 1 << 8
_Py_TPFLAGS_HEAPTYPE = 1 << 9


def _make_audit_hook():
  """An audit hook that refuses the ways to reach the harness's locals."""
  denied_events, denied_attributes = _DENIED_EVENTS, _DENIED_ATTRIBUTES
  stat_, fsdecode, isinstance_ = os.stat, os.fsdecode, isinstance
  refused = RuntimeError
  proc_device = os.stat("/proc").st_dev if os.path.isdir("/proc") else None

  def hook(event, args):
    if (event in denied_events or event.startswith("ctypes.") or
        (event == "object.__getattr__" and args[1] in denied_attributes)):
      raise refused(f"{event} is not allowed in the sandbox")
    if event == "open" and isinstance_(args[0], (str, bytes)):
      try:
        device = stat_(fsdecode(args[0])).st_dev
      except OSError:
        return  # A new file: not in /proc.
      if device == proc_device:
        raise refused("opening files under /proc is not allowed in the "
                      "sandbox")
  return hook


def _make_test_namespace_builder():
  """A function (solution namespace, builtins) -> the tests' namespace, in
  which every callable the solution made returns only plain data."""
  type_, isinstance_, callable_, any_ = type, isinstance, callable, any
  plain_types, container_types = _PLAIN_TYPES, _CONTAINER_TYPES
  heap, immutable = _Py_TPFLAGS_HEAPTYPE, _Py_TPFLAGS_IMMUTABLETYPE
  module_type, builtin_function = type_(os), type_(len)
  not_plain = TypeError

  def python_class(cls):
    return bool(cls.__flags__ & heap and not cls.__flags__ & immutable)

  def check_plain(value, depth=0):
    value_type = type_(value)
    if value_type in plain_types:
      return
    if value_type in container_types and depth < 100:
      for item in (value.items() if value_type is dict else value):
        if value_type is dict:
          check_plain(item[0], depth + 1)
          check_plain(item[1], depth + 1)
        else:
          check_plain(item, depth + 1)
      return
    if any_(python_class(cls) for cls in value_type.__mro__):
      raise not_plain(f"the solution returned a {value_type.__name__}; "
                      "only built-in data types are accepted")

  def guarded(function):
    def call(*args, **kwargs):
      result = function(*args, **kwargs)
      check_plain(result)
      return result
    return call

  def needs_guard(value):
    if isinstance_(value, type_):
      return python_class(value)
    return callable_(value) and not isinstance_(
        value, (module_type, builtin_function))

  def build(namespace, builtins_dict):
    tests_namespace = {name: guarded(value) if needs_guard(value) else value
                       for name, value in namespace.items()}
    tests_namespace["__builtins__"] = builtins_dict
    return tests_namespace
  return build


def _harness() -> None:
  """Reads the payload, runs solution and tests, reports; never returns."""
  write, exit_now, exec_, compile_ = os.write, os._exit, exec, compile
  stdout, stderr = sys.stdout, sys.stderr
  base_exception, report_failure = BaseException, _report_failure
  try:
    chunks = []
    while chunk := os.read(0, 1 << 16):
      chunks.append(chunk)
    payload = json.loads(b"".join(chunks))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    verdict = f"\n{payload.pop('nonce')}\n".encode()
    solution_code = compile_(payload.pop("solution"), "solution.py", "exec")
    tests_code = compile_(payload.pop("tests"), "tests.py", "exec")
    del chunks, payload
    import builtins  # pylint: disable=g-import-not-at-top
    import _signal  # pylint: disable=g-import-not-at-top
    pristine_builtins = dict(builtins.__dict__)
    build_tests_namespace = _make_test_namespace_builder()
    sys.addaudithook(_make_audit_hook())
    # Signal handlers receive the interrupted frame.
    _signal.signal = signal.signal = _disabled_signal
    namespace = {"__name__": "solution",
                 "__builtins__": dict(pristine_builtins)}
  except BaseException as e:  # pylint: disable=broad-except
    write(2, f"sandbox harness failed: {type(e).__name__}: {e}\n".encode())
    exit_now(_SETUP_FAILED)
  try:
    exec_(solution_code, namespace)
    exec_(tests_code, build_tests_namespace(namespace, pristine_builtins))
  except base_exception as e:  # pylint: disable=broad-except
    report_failure(e, write)
    exit_now(1)
  for stream in (stdout, stderr):
    try:
      stream.flush()
    except base_exception:  # pylint: disable=broad-except
      pass
  write(1, verdict)
  exit_now(0)


def _disabled_signal(*args, **kwargs):
  raise RuntimeError("signal handlers are not allowed in the sandbox")


def _report_failure(error: BaseException, write) -> None:
  """Writes the failure's type and line numbers (frames are off limits)."""
  lines = []
  traceback = error.__traceback__.tb_next  # Skip the harness's own frame.
  while traceback is not None:
    lines.append(str(traceback.tb_lineno))
    traceback = traceback.tb_next
  try:
    message = f"{type(error).__name__}: {error}"
  except BaseException:  # pylint: disable=broad-except
    message = type(error).__name__
  write(2, f"\n{message} (lines {', '.join(lines)})\n".encode(
      errors="replace")[:4000])


def _main(argv: list[str]) -> None:
  mode, sock_fd, config = argv[0], int(argv[1]), json.loads(argv[2])
  if mode == "namespaces":
    _enter_namespaces(config["uid"])
    config["scratch"] = _SCRATCH
  else:
    _die_with_parent(_libc())
    if mode == "rlimits":
      # Orphans of a program re-parent to us so that they can be reaped.
      _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
  _serve(sock_fd, config)


if __name__ == "__main__":
  _main(sys.argv[1:])
