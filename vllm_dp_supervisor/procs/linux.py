"""The few Linux calls the supervisor makes: prctl, process groups, reaping by pid.

Nothing here waits on "any child" (`waitpid(-1)`): that would steal exit statuses from asyncio's
child watcher. Orphans that the kernel hands to us as subreaper are reaped one pid at a time.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from collections.abc import Callable, Collection
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def set_child_subreaper() -> None:
    """Orphaned descendants (a vLLM engine whose API server died) are re-parented to us."""
    _check(_prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def child_setup(parent_pid: int, death_signal: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn: the child gets `death_signal` when the supervisor dies, however it dies.

    Runs between fork and exec, so it only calls the prctl bound above and async-signal-safe os
    functions. If the supervisor already died before prctl took effect, the child ends itself.
    """
    def setup() -> None:
        if _prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), death_signal)
    return setup


def reap(pidfd: int) -> int:
    """Reap the exited child behind `pidfd`: its returncode (-N for signal N)."""
    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    assert result is not None  # without WNOHANG, waitid returns once the child has exited
    return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a whole process group. False if the group has no process left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def group_exists(pgid: int) -> bool:
    """True while any process, zombies included, is in the group."""
    return signal_group(pgid, 0)


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (every thread's list)."""
    result: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return result
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                result.extend(int(p) for p in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return result


def reap_orphans(exclude: Collection[int]) -> list[tuple[int, int]]:
    """Reap our exited children that nobody else waits for; returns [(pid, returncode)].

    `exclude` holds the pids someone else reaps (asyncio's watcher, a Popen); each of the others
    is an orphan the kernel gave us as subreaper, or a zombie left to PID 1 in a container.
    """
    reaped = []
    for pid in children_of(os.getpid()):
        if pid in exclude:
            continue
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if got == pid:
            reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped


# ---- /proc readers: cheap, no process is signalled ----

def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def describe_pids(pids: list[int]) -> str:
    """'pid 123 (python3), pid 456 (nginx)', for messages."""
    return ", ".join(f"pid {pid} ({process_name(pid)})" for pid in pids)


def is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker: it alone knows the semaphores (/dev/shm/sem.mp-*) its
    users made, and unlinks them once they are all gone. It ignores SIGTERM."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def is_zombie(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, walking /proc/<pid>/task/*/children: it reads only the tree's
    own files, never every process on the machine."""
    found: list[int] = []
    queue = children_of(pid)
    while queue:
        child = queue.pop()
        found.append(child)
        queue.extend(children_of(child))
    return found


def environ_of(pid: int) -> dict[str, str]:
    """The environment `pid` started with (what it inherited or was given at exec); {} if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in data.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


async def readable(fd: int) -> None:
    """Return once `fd` is readable on the event loop (a pidfd: its process has exited)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)
    loop.add_reader(fd, ready)
    try:
        await done
    finally:
        loop.remove_reader(fd)


async def exited(pid: int) -> None:
    """Return once `pid` has exited, without reaping it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await readable(pidfd)
    finally:
        os.close(pidfd)


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, it names one process for good."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def pgid_of(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[2])


def kernel_wait(pid: int) -> tuple[str, str] | None:
    """(state letter, wait channel) of `pid`'s main thread, as /proc says: "S" and
    "do_sched_setaffinity" is a process asleep in that system call; a running one has wchan "0"
    (shown as ""). None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
    except (OSError, IndexError):
        return None
    return state, "" if wchan == "0" else wchan


def shm_files_of(pid: int) -> set[str]:
    """POSIX shared-memory files (/dev/shm/...) that `pid` maps or holds open."""
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[5].strip() if line.count(" ") >= 5 else ""
                if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                    found.add(path)
    except (OSError, IndexError):
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/") and not target.endswith("(deleted)"):
                found.add(target)
    except OSError:
        pass
    return found


_TCP_LISTEN = "0A"


def listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on TCP `port` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], int(fields[9])
                    if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port and inode:
                        inodes.add(inode)
        except (OSError, IndexError, ValueError):
            continue
    return inodes


def socket_holders(inodes: set[int]) -> list[int]:
    """Pids of live processes holding any of these socket inodes (a scan of every /proc/*/fd)."""
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and not is_zombie(int(name)) and holds_any_socket(int(name), inodes)]


def holds_any_socket(pid: int, inodes: set[int]) -> bool:
    wanted = {f"socket:[{i}]" for i in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def oom_kills(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """How many processes the kernel's OOM killer has killed in our memory cgroup (the container,
    our ranks with it): `oom_kill` of cgroup v2's memory.events, or of v1's memory.oom_control.
    None when it cannot be read (no cgroup memory controller, an old kernel, a sandbox)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    places = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # cgroup v2's unified hierarchy
            places.append(Path(root + path.rstrip("/")) / "memory.events")
        elif "memory" in controllers.split(","):
            places.append(Path(root + "/memory" + path.rstrip("/")) / "memory.oom_control")
    for place in places:
        try:
            for line in place.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None
