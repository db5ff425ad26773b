"""What the supervisor writes: its own lines and the ranks' through bounded queues (`console`),
the JSON records of --log-format json (`json_log`), and each rank's output read from its pipes,
kept, written to files and teed (`ranks`).

Must never: block the event loop on a write (a stuck stderr or a full disk), stop reading a rank's
pipes, or import the core.
"""

from vllm_dp_supervisor.output.console import Console, ConsoleHandler
from vllm_dp_supervisor.output.json_log import JsonFormatter
from vllm_dp_supervisor.output.ranks import RankOutput

__all__ = ["Console", "ConsoleHandler", "JsonFormatter", "RankOutput"]
