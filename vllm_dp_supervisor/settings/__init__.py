"""The supervisor's settings: the command line and environment read into one frozen `Config`, the
rules between options, the plan of each rank (port, devices, argv, environment, URL), and the exit
codes. Everything here is pure data and pure functions of it.

Must never: do I/O (no socket, process or file; `preflight.py` is where start-up touches the
machine), or import a package of the supervisor other than `server`'s pure facts of vLLM.
"""

from vllm_dp_supervisor.settings.config import Config, ConfigError, RestartRules, RouterSettings
from vllm_dp_supervisor.settings.options import parse_config
from vllm_dp_supervisor.settings.plan import Inventory, RankSpec, plan_ranks

__all__ = ["Config", "ConfigError", "Inventory", "RankSpec", "RestartRules", "RouterSettings", "parse_config",
           "plan_ranks"]
