"""The supervisor's control port: the HTTP API (`server`: /live, /ready, /status, /metrics,
/events, the operator actions) within bounds on its clients (`bounds`), /status's body
(`status`), the Prometheus registry that implements the core's counters (`metrics`) and every
rank's own series (`rank_metrics`).

Must never: write rank state (it reads the published view and calls the machine's operator
actions), or show a secret (argv, environment, tokens) in any answer.
"""

from vllm_dp_supervisor.api.metrics import PodMetrics
from vllm_dp_supervisor.api.rank_metrics import RankMetrics
from vllm_dp_supervisor.api.server import ApiServer, build_app
from vllm_dp_supervisor.api.status import status

__all__ = ["ApiServer", "PodMetrics", "RankMetrics", "build_app", "status"]
