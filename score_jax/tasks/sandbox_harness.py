"""What runs inside the sandbox: the container's init and the program's harness.

Two trust levels, both below the parent (`tasks/sandbox.py`, which builds the
containers and reads the verdict):
  * The container's init (trusted, unprivileged): started by the parent as
    `python -I sandbox_harness.py <backend> <socket fd> <config>`, it enters
    its namespaces ("namespaces" backend), then forks one child per program
    the parent sends, and when the program ends or is to be killed, kills
    every process it started and reaps them, so the next program starts
    alone. As pid 1 of its pid namespace ("bwrap", "namespaces") it kills
    every other process there; in "rlimits" it is a child subreaper, so that
    every process the program starts, daemons that called setsid or
    double-forked included, stays its descendant until it dies, and it kills
    its descendants.
  * The harness (runs in the program's own process, beside the untrusted
    solution).

Verdict (not fakeable by printing or exiting): the parent draws a random nonce
per run and sends it, with the solution and the tests, through the program's
stdin. The harness reads all of stdin, closes it, and keeps the nonce and
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
inside one interpreter, not a security boundary: the OS isolation is.
Known gaps: a solution that monkeypatches a stdlib module the tests call
(e.g. `math.isclose`) can sway those tests, and a determined one could rebuild
a module the harness disabled through importlib internals.

Standard library only: in "bwrap" this file is the only one of the
repository inside the container.
"""

import collections
import ctypes
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
from typing import Optional

# Directories bound read-only into the containers (besides Python's own).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# The containers' private scratch tmpfs, where programs get their directories.
SCRATCH = "/sandbox"
SCRATCH_BYTES = 64 << 20

# Modules loaded in the container before forking programs: what HumanEval and
# MBPP solutions import, so a program does not pay for their import.
_PRELOADED_MODULES = (
  "bisect",
  "cmath",
  "collections",
  "copy",
  "dataclasses",
  "datetime",
  "decimal",
  "fractions",
  "functools",
  "hashlib",
  "heapq",
  "itertools",
  "json",
  "math",
  "operator",
  "random",
  "re",
  "statistics",
  "string",
  "sys",
  "typing",
)
_DEVICES = ("null", "zero", "full", "random", "urandom")
_SETUP_FAILED = 125


def python_dirs() -> list[str]:
  """Directories that hold this Python installation."""
  dirs = {
    sys.prefix,
    sys.base_prefix,
    sys.exec_prefix,
    sys.base_exec_prefix,
    os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
  }
  return sorted(os.path.realpath(d) for d in dirs)


def pivot_root_syscall() -> Optional[int]:
  """The pivot_root(2) system call number on this machine's architecture
  (x86_64, aarch64), or None on another."""
  return {"x86_64": 155, "aarch64": 41}.get(platform.machine())


# ----------------------------------------------------------------------------
# The container's init.

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


def _die_with_parent(libc) -> None:
  _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def _enter_namespaces(uid: int) -> None:
  """Moves this process into fresh namespaces with a minimal read-only root.

  Returns in the new pid namespace's init (pid 1), running as `uid`; the
  original process stays outside, waits for it and exits with its status.
  """
  libc = _libc()
  _die_with_parent(libc)
  _check(
    libc.unshare(
      _CLONE_NEWNS
      | _CLONE_NEWUTS
      | _CLONE_NEWIPC
      | _CLONE_NEWPID
      | _CLONE_NEWNET
    ),
    "unshare",
  )
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
    _check(
      libc.mount(
        _bytes(source),
        _bytes(target),
        _bytes(fstype),
        ctypes.c_ulong(flags),
        _bytes(data),
      ),
      f"mount {target}",
    )

  mount(None, "/", None, _MS_REC | _MS_PRIVATE)
  root = "/tmp"
  mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
  read_only = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
  for path in SYSTEM_DIRS + tuple(python_dirs()):
    target = root + path
    if os.path.islink(path):
      os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
      os.makedirs(target, exist_ok=True)
      mount(path, target, None, _MS_BIND | _MS_REC)
      mount(None, target, None, read_only)
  os.mkdir(root + "/dev")
  for device in _DEVICES:
    open(f"{root}/dev/{device}", "w").close()
    mount(f"/dev/{device}", f"{root}/dev/{device}", None, _MS_BIND)
  os.mkdir(root + "/proc")
  mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  os.mkdir(root + SCRATCH)
  mount(
    "tmpfs",
    root + SCRATCH,
    "tmpfs",
    _MS_NOSUID | _MS_NODEV,
    f"mode=0700,size={SCRATCH_BYTES}",
  )
  os.chown(root + SCRATCH, uid, uid)
  os.chdir(root)
  os.mkdir(".old")
  _check(libc.syscall(pivot_root_syscall(), b".", b".old"), "pivot_root")
  os.chdir("/")
  _check(libc.umount2(b"/.old", _MNT_DETACH), "umount")
  os.rmdir("/.old")
  mount(None, "/", None, read_only)
  libc.sethostname(b"sandbox", 7)
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)
  os.chdir(SCRATCH)


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
    error = _run_child(sock, fds, json.loads(message), scratch, config["uid"])
    sock.send(json.dumps({"error": error}).encode())


def _run_child(
  sock: socket.socket,
  fds: list[int],
  limits: dict,
  scratch: str,
  uid: Optional[int],
) -> Optional[str]:
  """Forks the program, waits for its end or a kill request, cleans up;
  returns why the program's process could not be set up, if it could not."""
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
  ready, _, _ = select.select([pidfd, sock.fileno()], [], [])
  parent_gone = sock.fileno() in ready and not sock.recv(16)
  _end_program(pid)
  if parent_gone:
    os._exit(0)
  os.close(pidfd)
  shutil.rmtree(workdir, onerror=_force_remove)
  return error


def _enter_child(
  fds: list[int], workdir: str, limits: dict, uid: Optional[int]
) -> None:
  """Turns the forked child into the confined program's process."""
  os.setsid()
  os.dup2(fds[0], 0)
  os.dup2(fds[1], 1)
  os.dup2(fds[1], 2)
  for fd in fds:
    os.close(fd)
  os.chdir(workdir)
  os.environ.update(HOME=workdir, TMPDIR=workdir)
  cpu_s = int(limits["timeout_s"]) + 1
  for limit, value in (
    (resource.RLIMIT_CPU, cpu_s),
    (resource.RLIMIT_AS, limits["memory_mb"] << 20),
    (resource.RLIMIT_FSIZE, limits["file_size_mb"] << 20),
    (resource.RLIMIT_NOFILE, limits["max_open_files"]),
    (resource.RLIMIT_NPROC, limits["max_processes"]),
    (resource.RLIMIT_CORE, 0),
  ):
    _, hard = resource.getrlimit(limit)
    if hard != resource.RLIM_INFINITY:
      value = min(value, hard)
    resource.setrlimit(limit, (value, value))
  if uid is not None and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
  _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _end_program(pid: int) -> None:
  """Kills the program and every process it started, and reaps them all."""
  for kill in (os.kill, os.killpg):
    try:
      kill(pid, signal.SIGKILL)
    except OSError:
      pass
  os.waitpid(pid, 0)  # From here on its orphans are our children.
  while True:
    try:
      if os.waitpid(-1, os.WNOHANG)[0] == 0:  # Something is left.
        _kill_the_rest()
        os.waitpid(-1, 0)
    except ChildProcessError:
      return  # Nothing is left.


def _kill_the_rest() -> None:
  """SIGKILLs what the program left running: as pid 1, every other process
  of the pid namespace; otherwise ("rlimits", a child subreaper) every
  descendant, which is every process the program started."""
  for target in [-1] if os.getpid() == 1 else _descendants():
    try:
      os.kill(target, signal.SIGKILL)
    except OSError:
      pass


def _descendants() -> list[int]:
  """The processes below this one, by their parents in /proc."""
  children = collections.defaultdict(list)
  with os.scandir("/proc") as entries:
    for entry in entries:
      if not entry.name.isdigit():
        continue
      try:
        with open(f"/proc/{entry.name}/stat", "rb") as stat:
          # "pid (comm) state ppid ..."; comm may hold spaces and ")".
          ppid = int(stat.read().rpartition(b")")[2].split()[1])
      except (OSError, IndexError, ValueError):
        continue  # It has just exited.
      children[ppid].append(int(entry.name))
  found, generation = [], [os.getpid()]
  while generation:
    generation = [child for pid in generation for child in children[pid]]
    found += generation
  return found


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

_DENIED_EVENTS = frozenset(
  (
    "sys._getframe",
    "sys._current_frames",
    "sys._current_exceptions",
    "sys.settrace",
    "sys.setprofile",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
    # The program's own sockets, on every backend (the only network guard of
    # "rlimits"; a program it starts runs without this hook).
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "socket.sendmsg",
  )
)
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
    if (
      event in denied_events
      or event.startswith("ctypes.")
      or (event == "object.__getattr__" and args[1] in denied_attributes)
    ):
      raise refused(f"{event} is not allowed in the sandbox")
    if event == "open" and isinstance_(args[0], (str, bytes)):
      try:
        device = stat_(fsdecode(args[0])).st_dev
      except OSError:
        return  # A new file: not in /proc.
      if device == proc_device:
        raise refused("opening files under /proc is not allowed in the sandbox")

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
      for item in value.items() if value_type is dict else value:
        if value_type is dict:
          check_plain(item[0], depth + 1)
          check_plain(item[1], depth + 1)
        else:
          check_plain(item, depth + 1)
      return
    if any_(python_class(cls) for cls in value_type.__mro__):
      raise not_plain(
        f"the solution returned a {value_type.__name__}; "
        "only built-in data types are accepted"
      )

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
      value, (module_type, builtin_function)
    )

  def build(namespace, builtins_dict):
    tests_namespace = {
      name: guarded(value) if needs_guard(value) else value
      for name, value in namespace.items()
    }
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
    import _signal  # pylint: disable=g-import-not-at-top
    import builtins  # pylint: disable=g-import-not-at-top

    pristine_builtins = dict(builtins.__dict__)
    build_tests_namespace = _make_test_namespace_builder()
    sys.addaudithook(_make_audit_hook())
    # Signal handlers receive the interrupted frame.
    _signal.signal = signal.signal = _disabled_signal
    namespace = {
      "__name__": "solution",
      "__builtins__": dict(pristine_builtins),
    }
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
  write(
    2,
    f"\n{message} (lines {', '.join(lines)})\n".encode(errors="replace")[:4000],
  )


def _main(argv: list[str]) -> None:
  mode, sock_fd, config = argv[0], int(argv[1]), json.loads(argv[2])
  if mode == "namespaces":
    _enter_namespaces(config["uid"])
    config["scratch"] = SCRATCH
  else:
    _die_with_parent(_libc())
  if os.getpid() != 1:
    # Not the init of a pid namespace ("rlimits"): the orphans of a program
    # re-parent to us instead, so that every process it starts stays our
    # descendant until it dies.
    _check(_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")
  _serve(sock_fd, config)


if __name__ == "__main__":
  _main(sys.argv[1:])
