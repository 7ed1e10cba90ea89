"""Hostile programs: each is contained, counted as failed, and the evaluation goes on.

Every test also checks that nothing is left behind: no process whose command line names a
sandbox directory, no sandbox directory in the temp dir.
"""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import uuid

import pytest

from forgetless.eval.sandbox import SANDBOX_PREFIX, SandboxLimits, namespace_prefix, run_program, run_programs

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=512, output_bytes=1 << 16)
GOOD = "def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n"
IS_ROOT = os.geteuid() == 0
HAS_NS = bool(namespace_prefix())


MINE = f"{SANDBOX_PREFIX}{os.getpid()}-"  # other test runs on this machine may use sandboxes too


def _stray_processes() -> list[str]:
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if MINE.encode() in f.read():
                    found.append(cmdline)
        except OSError:
            continue  # the process ended while we looked
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert _stray_processes() == []
    assert glob.glob(os.path.join(tempfile.gettempdir(), MINE + "*")) == []


def test_good_program_passes_and_wrong_one_fails():
    ok, bad = run_programs([GOOD, GOOD.replace("== 3", "== 4")], LIMITS)
    assert (ok.passed, ok.status) == (True, "passed")
    assert (bad.passed, bad.status) == (False, "failed")
    assert "AssertionError" in bad.stderr


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", LIMITS)
    assert (result.passed, result.status) == (False, "timeout")


def test_fork_bomb_is_refused():
    result = run_program("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert not result.passed
    assert "os.fork is not allowed" in result.stderr


@pytest.mark.skipif(not (IS_ROOT and HAS_NS),
                    reason="needs root and unshare for RLIMIT_NPROC as nobody + a PID namespace")
def test_fork_bomb_without_audit_hook_is_contained_by_nproc_and_pid_namespace():
    # The hook can be bypassed; the next layers must still hold: RLIMIT_NPROC as 'nobody', the
    # process group kill, and the PID namespace for children that left the group with setsid().
    bomb = ("import os, time\n"
            "for _ in range(10000):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.setsid()\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n"
            "time.sleep(60)\n")
    limits = SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=16, audit_hook=False)
    result = run_program(bomb, limits)
    assert not result.passed
    assert result.status == "timeout"


def test_huge_allocation_fails_with_memory_error():
    result = run_program("x = bytearray(10 * 1024 ** 3)\n", LIMITS)
    assert (result.passed, result.status) == (False, "memory")


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    return server


def _connect_program(port: int) -> str:
    return f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n"


def _assert_connect_blocked(limits: SandboxLimits) -> None:
    """A sandboxed program connecting to a host listener neither reaches it nor passes."""
    server = _listener()
    try:
        result = run_program(_connect_program(server.getsockname()[1]), limits)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert not result.passed


def test_network_connect_is_refused():
    _assert_connect_blocked(LIMITS)


@pytest.mark.skipif(not HAS_NS, reason="unshare (network namespace) not available")
def test_network_namespace_alone_blocks_host_loopback():
    _assert_connect_blocked(SandboxLimits(timeout_s=2.0, audit_hook=False, drop_privileges=False))


def test_deleting_files_in_home_and_elsewhere_is_refused(tmp_path):
    canary = tmp_path / "home" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    program = ("import os, shutil\n"
               f"os.remove({str(canary)!r})\n")
    program2 = f"import shutil\nshutil.rmtree({str(canary.parent)!r})\n"
    program3 = ("import os, shutil\nhome = os.path.expanduser('~')\nopen(os.path.join(home, 'x'), 'w').write('1')\n"
                "shutil.rmtree(home)\n")
    results = run_programs([program, program2, program3], LIMITS)
    assert canary.read_text() == "keep me"
    assert [r.passed for r in results[:2]] == [False, False]
    # '~' is the sandbox's own empty directory: whatever program3 does there harms nothing outside.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("limits", [LIMITS, SandboxLimits(timeout_s=2.0, namespaces=False, drop_privileges=False)],
                         ids=["all-layers", "hook-only"])
def test_environment_secrets_are_not_visible(monkeypatch, limits):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("FORGETLESS_TEST_SECRET", secret)
    program = ("import os\n"
               "print(dict(os.environ))\n"
               "print(open('/proc/self/environ').read())\n"
               f"print(open('/proc/{os.getpid()}/environ').read())\n")
    result = run_program(program, limits)
    assert secret not in result.stdout + result.stderr
    assert "FORGETLESS_TEST_SECRET" not in result.stdout


def test_writing_outside_its_directory_is_refused(tmp_path):
    targets = [os.path.join(tempfile.gettempdir(), f"escape-{uuid.uuid4().hex}"), str(tmp_path / "escape.txt")]
    programs = [f"open({t!r}, 'w').write('x')\n" for t in targets]
    programs.append(f"import os\nfd = os.open({targets[0]!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n")
    programs.append("open('inside.txt', 'w').write('fine')\nassert open('inside.txt').read() == 'fine'\n")
    results = run_programs(programs, LIMITS)
    assert [r.passed for r in results] == [False, False, False, True]
    assert not any(os.path.exists(t) for t in targets)


def test_killing_its_parent_is_refused():
    program = f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)\n"
    result = run_program(program, LIMITS)
    assert not result.passed  # and we are still here to check it


def test_reading_stdin_gets_end_of_file_not_a_hang():
    result = run_program("x = input()\n", LIMITS)
    assert (result.passed, result.status) == (False, "failed")
    assert "EOFError" in result.stderr


def test_printing_a_gigabyte_is_cut_at_the_cap():
    result = run_program("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))\n", LIMITS)
    assert (result.passed, result.status) == (False, "output_limit")
    assert len(result.stdout) <= LIMITS.output_bytes


def test_exiting_early_never_passes():
    result = run_program("import sys\nsys.exit(0)\nassert False\n", LIMITS)
    assert (result.passed, result.status) == (False, "early_exit")


def test_evaluation_goes_on_after_hostile_programs():
    hostile = ["while True:\n    pass\n", "import os\nos.fork()\n", "x = bytearray(10 * 1024 ** 3)\n", "input()\n"]
    results = run_programs(hostile + [GOOD], LIMITS, workers=2)
    assert [r.passed for r in results] == [False, False, False, False, True]


def test_limits_are_validated():
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
