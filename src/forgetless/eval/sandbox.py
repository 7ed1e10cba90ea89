"""Run untrusted generated Python (MBPP solutions + asserts) in a contained subprocess.

Each program runs in its own process with:

* a fresh, empty temporary working directory (deleted afterwards) that is also its ``$HOME``;
* a stripped environment (``PATH``, ``HOME``, ``LANG`` only: no secrets from the evaluator);
* stdin from ``/dev/null``; stdout/stderr to files capped by ``RLIMIT_FSIZE`` (the process is
  killed by ``SIGXFSZ`` at the cap);
* rlimits on address space, CPU time, open files, core dumps;
* a wall-time limit, after which its whole process group is killed;
* when ``unshare`` works (root, or unprivileged user namespaces): new network namespace (no
  network at all, not even the host's loopback), new PID namespace (when the program's first
  process dies the kernel kills every process it left behind) and new mount namespace with
  private tmpfs over ``/tmp``, ``/var/tmp`` and ``/dev/shm``;
* when started as root: privileges dropped to ``nobody`` inside, so ``RLIMIT_NPROC`` is enforced
  (it is not for root) and file permissions apply;
* a Python audit hook that refuses fork/exec/subprocess, signals, sockets, ctypes, and writes or
  deletions outside the working directory.

It is a guard against accidents and sloppy or mildly hostile model output, not a security
boundary against a determined attacker: see docs/sandbox.md.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

NOBODY_UID = 65534
NOBODY_GID = 65534
SANDBOX_PREFIX = "forgetless-sbx-"
EARLY_EXIT_CODE = 3  # the program called sys.exit()/exit() before its end: later asserts never ran
# Standard modules generated solutions use, imported before privileges are dropped.
PRELOAD_MODULES = ("math", "cmath", "re", "heapq", "collections", "collections.abc", "itertools", "functools",
                   "string", "bisect", "operator", "array", "statistics", "fractions", "decimal", "random",
                   "copy", "datetime", "typing", "json", "unicodedata", "textwrap", "numbers", "struct",
                   "dataclasses", "enum", "hashlib", "calendar", "time", "io", "sys", "os", "sortedcontainers",
                   "regex")
_NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--mount", "--kill-child"]

# Runs inside the child before the program. argv: program path, nproc limit, flags.
_BOOTSTRAP = r'''
import os, sys
prog, nproc, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3]
work = os.path.dirname(prog)
os.chdir(work)
src = open(prog, encoding="utf-8", errors="replace").read()
import resource
# Imported before dropping privileges: the interpreter's own files may be unreadable to nobody.
# numpy only for programs that use it (MBPP+'s test harness does): it costs ~0.1 s to import.
for _m in %(preload)r + (("numpy",) if "numpy" in src else ()):
    try:
        __import__(_m)
    except ImportError:
        pass
if "m" in flags:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for target in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        libc.mount(b"tmpfs", target, b"tmpfs", 0, b"size=64m,mode=1777")
if "d" in flags and os.getuid() == 0:
    try:
        os.setgroups([]); os.setgid(%(gid)d); os.setuid(%(uid)d)
    except OSError:
        pass  # a user namespace that maps only root: stay, the namespaces still apply
if nproc > 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
if "h" in flags:
    def _inside(path):
        if isinstance(path, int):
            return True
        path = os.path.realpath(os.fsdecode(path))
        return path == work or path.startswith(work + os.sep) or path == os.devnull
    _deny = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
             "subprocess.Popen", "os.kill", "os.killpg", "socket.__new__", "socket.connect",
             "socket.bind", "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
             "resource.setrlimit", "resource.prlimit", "os.setuid", "sys.remote_exec"}
    _paths = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.chmod", "os.chown",
              "os.truncate", "os.mkdir", "os.symlink", "os.link", "os.utime", "shutil.copyfile",
              "shutil.move"}
    _write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _hook(event, args):
        if event in _deny:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in _paths and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the working directory")
        if event == "open" and args[0] is not None:
            if isinstance(args[0], (str, bytes)) and os.fsdecode(args[0]).startswith("/proc/") and \
                    os.path.basename(os.fsdecode(args[0])) in ("environ", "mem", "cmdline"):
                raise PermissionError("sandbox: reading other processes' environment is not allowed")
            mode, flags_ = args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or (flags_ & _write)
            if writes and not _inside(args[0]):
                raise PermissionError("sandbox: writing outside the working directory")
    sys.addaudithook(_hook)
sys.dont_write_bytecode = True
code = compile(src, "program.py", "exec")
del src
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    # Leaving early would skip the asserts after the solution: never a pass.
    sys.stderr.write(f"sandbox: program exited early ({e.code!r})\n")
    sys.stderr.flush()
    os._exit(%(early)d)
''' % {"preload": PRELOAD_MODULES, "uid": NOBODY_UID, "gid": NOBODY_GID, "early": EARLY_EXIT_CODE}


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program run."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    max_processes: int = 64
    open_files: int = 256
    namespaces: bool = True
    drop_privileges: bool = True
    audit_hook: bool = True

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1024:
            raise ValueError("sandbox limits: timeout_s > 0, memory_mb >= 64, output_bytes >= 1024")
        if self.max_processes < 1 or self.open_files < 16:
            raise ValueError("sandbox limits: max_processes >= 1, open_files >= 16")


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | memory | output_limit | early_exit | killed:<SIG>
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command prefix that works here, or () when none does (then: rlimits + hook only)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    candidates = [[exe, *_NAMESPACE_FLAGS]]
    if os.geteuid() != 0:
        candidates.append([exe, "--user", "--map-root-user", *_NAMESPACE_FLAGS])
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return tuple(prefix)
    logger.warning("unshare is not usable here: the sandbox runs without network/PID/mount namespaces")
    return ()


def _set_rlimits(limits: SandboxLimits) -> None:
    """Runs in the forked child before exec (preexec_fn)."""
    mem = limits.memory_mb << 20
    cpu = int(limits.timeout_s) + 2
    for which, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, limits.output_bytes), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, limits.open_files)):
        resource.setrlimit(which, (value, value))


def _status(returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == EARLY_EXIT_CODE and "sandbox: program exited early" in stderr:
        return "early_exit"
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGXFSZ:
            return "output_limit"
        try:
            return f"killed:{signal.Signals(sig).name}"
        except ValueError:
            return f"killed:{sig}"
    if "File too large" in stderr:  # CPython ignores SIGXFSZ, so the cap shows as EFBIG
        return "output_limit"
    if "MemoryError" in stderr:
        return "memory"
    return "failed"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _processes_with(marker: bytes) -> list[int]:
    """Pids whose command line contains ``marker`` (the sandbox's unique directory)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry.name))
            except OSError:
                continue  # ended while we looked
    return pids


def _reap(marker: bytes, grace_s: float = 5.0) -> None:
    """Wait until no process of this sandbox is left. The kernel tears a PID namespace down
    asynchronously after its init dies; without namespaces, leftovers are killed one by one."""
    deadline = time.monotonic() + grace_s
    while pids := _processes_with(marker):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > deadline:
            logger.warning("sandbox: processes %s still alive after %.0f s", pids, grace_s)
            return
        time.sleep(0.02)


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as a Python program under ``limits``; never raises for what the program does."""
    # The evaluator's pid in the name tells whose sandbox a directory or process is.
    root = Path(tempfile.mkdtemp(prefix=f"{SANDBOX_PREFIX}{os.getpid()}-"))
    work, logs = root / "work", root / "logs"
    work.mkdir()
    logs.mkdir(mode=0o700)
    prog = work / "program.py"
    prog.write_text(source, encoding="utf-8")
    os.chmod(root, 0o711)  # nobody may traverse to work/, not list root/ or read logs/
    prefix = namespace_prefix() if limits.namespaces else ()
    drop = limits.drop_privileges and os.geteuid() == 0
    if drop:
        os.chown(work, NOBODY_UID, NOBODY_GID)
        os.chown(prog, NOBODY_UID, NOBODY_GID)
    flags = ("m" if prefix else "") + ("d" if drop else "") + ("h" if limits.audit_hook else "")
    # RLIMIT_NPROC counts all of a user's processes: only meaningful once we are 'nobody'.
    nproc = limits.max_processes if drop else 0
    cmd = [*prefix, sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(prog), str(nproc), flags or "-"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    start = time.monotonic()
    timed_out = False
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                                    start_new_session=True, preexec_fn=functools.partial(_set_rlimits, limits))
        except OSError as e:
            shutil.rmtree(root, ignore_errors=True)
            return SandboxResult(False, "error", None, "", f"cannot start the sandbox: {e}", 0.0)
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Always: anything the program left running in its group goes too.
        _kill_group(proc.pid)
        proc.wait()
        if os.path.isdir("/proc"):
            _reap(str(root).encode())
    wall = time.monotonic() - start
    stdout = _read_capped(logs / "stdout", limits.output_bytes)
    stderr = _read_capped(logs / "stderr", limits.output_bytes)
    shutil.rmtree(root, ignore_errors=True)
    status = _status(proc.returncode, timed_out, stderr)
    return SandboxResult(status == "passed", status, proc.returncode, stdout, stderr, wall)


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(),
                 workers: int | None = None) -> list[SandboxResult]:
    """Run many programs, ``workers`` at a time (default: CPU count), results in input order."""
    workers = workers or max(1, min(len(sources), os.cpu_count() or 1))
    if workers == 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
