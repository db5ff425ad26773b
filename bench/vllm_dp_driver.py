"""Runs vLLM's own DPSupervisor (vllm.entrypoints.launchers.dp_supervisor, vLLM 0.32) over the
test stand-in, the way `vllm serve MODEL --data-parallel-multi-port-external-lb` would.

The arguments are parsed by vLLM's own `serve` argument parser; the only change is the child
entry function (`_run_vllm_dp_server`), replaced by one that execs the stand-in on the rank's
port. Everything else (probing, readiness, signal handling, shutdown) is vLLM's code.

    python bench/vllm_dp_driver.py --ranks 8 --port 8000 --supervisor-port 9256 --interval 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    own = argparse.ArgumentParser()
    own.add_argument("--ranks", type=int, required=True)
    own.add_argument("--port", type=int, required=True)
    own.add_argument("--supervisor-port", type=int, required=True)
    own.add_argument("--interval", type=float, default=5.0, help="dp-supervisor probe interval and timeout")
    opts = own.parse_args()

    import standin_exec
    from vllm.entrypoints.launchers import dp_supervisor
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([
        "bench-model", "--host", "127.0.0.1", "--port", str(opts.port),
        "--data-parallel-size", str(opts.ranks), "--data-parallel-size-local", str(opts.ranks),
        "--data-parallel-multi-port-external-lb",
        "--data-parallel-supervisor-port", str(opts.supervisor_port),
        "--dp-supervisor-probe-interval-s", str(opts.interval),
        "--dp-supervisor-probe-timeout-s", str(opts.interval),
    ])
    args.api_server_count = 1  # what `vllm serve` sets for this mode
    dp_supervisor._run_vllm_dp_server = standin_exec.exec_standin
    dp_supervisor.run_dp_supervisor(args)


if __name__ == "__main__":
    main()
