"""procs/linux.py's reading of the cgroup's OOM kill count, on files laid out as the kernel does,
and of where a process waits in the kernel."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.procs.linux import oom_kills


def cgroup_files(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    (tmp_path / "cgroup").write_text(proc_cgroup)
    for name, text in files.items():
        (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / name).write_text(text)
    return str(tmp_path / "cgroup"), str(tmp_path / "sys")


def test_cgroup_v2_memory_events(tmp_path):
    proc, root = cgroup_files(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n"})
    assert oom_kills(proc, root) == 2


def test_cgroup_v1_memory_oom_control(tmp_path):
    proc, root = cgroup_files(tmp_path, "5:devices:/\n4:memory:/process_api/abc\n0::/\n", {
        "memory/process_api/abc/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"})
    assert oom_kills(proc, root) == 7


def test_nothing_readable_is_none(tmp_path):
    assert oom_kills(str(tmp_path / "missing"), str(tmp_path)) is None
    proc, root = cgroup_files(tmp_path, "0::/\n", {"memory.events": "oom 1\n"})  # an old kernel: no oom_kill
    assert oom_kills(proc, root) is None
    proc, root = cgroup_files(tmp_path, "garbage\n", {})
    assert oom_kills(proc, root) is None



def test_kernel_wait_says_where_a_sleeping_process_waits():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while (wait := linux.kernel_wait(sleeper.pid)) is None or wait[0] != "S":
            assert time.monotonic() < deadline, wait
            time.sleep(0.01)
        assert wait[1] in ("hrtimer_nanosleep", "do_nanosleep", "")  # "" where the kernel hides it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert linux.kernel_wait(sleeper.pid) is None  # reaped: gone
