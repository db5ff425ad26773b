"""When a failed rank is restarted, and after how long. Pure: time and randomness come in as values.

`never`: the first failure stops the pod (the default). `on-failure`: a failed rank is restarted
unless its exit code says retrying is hopeless (--no-restart-exit-codes, default 2: bad
arguments). `always`: restarted whatever its exit code. Either way at most --max-restarts times
within --restart-window seconds, waiting a doubling delay (from --restart-backoff, at most
MAX_BACKOFF_S, with jitter so ranks that failed together do not return together). A rank that
stayed ready for --stable-after seconds starts again from the first delay.
"""

from __future__ import annotations

import collections
import dataclasses

from vllm_dp_supervisor.settings.config import MAX_BACKOFF_S, RestartPolicy, RestartRules

JITTER = 0.25  # the delay is drawn from [1 - JITTER, 1 + JITTER] x the doubled backoff


@dataclasses.dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float = 0.0
    why: str = ""  # when not restarting: the reason, for the operator


class RestartBudget:
    """One rank's restart history."""

    def __init__(self, rules: RestartRules) -> None:
        self.rules = rules
        self._recent: collections.deque[float] = collections.deque()  # times of restarts
        self.consecutive = 0  # failures since the rank was last stable: the backoff exponent
        self.total = 0

    def note_ready_for(self, seconds: float) -> None:
        """The rank has been ready this long; stable long enough resets the backoff."""
        if seconds >= self.rules.stable_after_s:
            self.consecutive = 0

    def decide(self, now: float, exit_code: int | None, jitter: float) -> Decision:
        """`exit_code`: None when the rank was alive but failing (hung, unhealthy, not ready in
        time). `jitter`: a number in [0, 1), e.g. random.random()."""
        rules = self.rules
        if rules.policy is RestartPolicy.NEVER:
            return Decision(False, why="--restart-policy never")
        if rules.policy is RestartPolicy.ON_FAILURE and exit_code in rules.no_restart_exit_codes:
            return Decision(False, why=f"exit code {exit_code} is not retried (--no-restart-exit-codes)")
        while self._recent and now - self._recent[0] > rules.window_s:
            self._recent.popleft()
        if len(self._recent) >= rules.max_restarts:
            return Decision(False, why=f"restart limit reached ({rules.max_restarts} within "
                                       f"{rules.window_s:g} s)")
        delay = min(MAX_BACKOFF_S, rules.backoff_s * 2 ** self.consecutive)
        delay = min(MAX_BACKOFF_S, delay * (1 - JITTER + 2 * JITTER * jitter))
        self._recent.append(now)
        self.consecutive += 1
        self.total += 1
        return Decision(True, delay)

    def count_operator_restart(self) -> None:
        """An operator's restart is counted, but never refused nor delayed."""
        self.total += 1
