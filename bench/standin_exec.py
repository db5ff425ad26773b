"""The child entry given to vLLM's DPSupervisor in the benchmark, in place of its vLLM server:
it execs the test stand-in on the port vLLM chose for that rank. Imports nothing heavy: vLLM's
supervisor starts its children with multiprocessing's spawn, which imports this module anew."""

import os
import sys
from pathlib import Path

STANDIN = str(Path(__file__).resolve().parent.parent / "tests" / "standin.py")


def exec_standin(child_args) -> None:
    os.setpgrp()  # as vLLM's own entry does
    extra = os.environ.get("BENCH_STANDIN_ARGS", "").split()
    os.execv(sys.executable, [sys.executable, STANDIN, "bench-model", "--host", "127.0.0.1",
                              "--port", str(child_args.port), *extra])
