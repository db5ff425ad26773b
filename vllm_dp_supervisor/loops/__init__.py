"""The loops around the state machine (machine.py), one module each.

Observers report what they saw as observations (observations.py) tagged with rank and attempt:
`spawn` (start a rank's attempt, watch it exit on a pidfd), `health` (/health and the deep probe),
`recovery` (vLLM's in-engine fault tolerance), `signals` (the handler queues, one task
dispatches). Mechanisms carry out the machine's verdicts through its verbs: `teardown` (stop trees
and verify them gone; reap; keep the guardian running) and `restart` (the restart sequence of a
group). `tasks` keeps every background task so a stop can cancel them all. None of them assigns a
rank's state.
"""
