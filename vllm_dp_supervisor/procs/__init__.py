"""Process trees: a rank's process and every descendant (`process`), the guardian that kills them
if the supervisor is SIGKILLed (`guard`, `guardian`), what a killed tree leaves in /dev/shm
(`leftovers`), and the few Linux calls it all rests on (`linux`).

Must never: import the core (it knows nothing of rank states; the loops tell it what to do), nor
wait on any child (`waitpid(-1)`), which would steal asyncio's exit statuses.
"""

from vllm_dp_supervisor.procs.guard import TreeGuard
from vllm_dp_supervisor.procs.process import RankProcess

__all__ = ["RankProcess", "TreeGuard"]
