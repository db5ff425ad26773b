"""What each rank holds in its KV cache, and where a prompt should go for it: the cache router
policy. A router worker reads every rank's own KV-cache events (vLLM's ZMQ publisher, `wire.py`)
into one index per attempt of each rank (`feed.py`, `index.py`), reads each prompt as the engine
will (the model's chat template and tokenizer, `model_files.py`, `template.py`, `prompts.py`),
and tells what each rank holds of a prompt's leading blocks (`holdings.py`). `routing.py` puts
these together for the worker; the cache policy (router/policies/cache.py) weighs them against
the ranks' load.

Exact across restarts: the supervisor tells the worker every rank's attempt; an index lives and
dies with the attempt whose engine it describes, and one that missed events it could not get back
is dropped. It may know less than an engine, never more.

Must never: import vLLM or transformers (the tokenizer is read with `tokenizers`, the template
with jinja2), download anything, or block the worker's loop on I/O (files are read in a thread,
events in a task). Imports nothing of the supervisor's but `settings`; loaded only by a router
worker under `--router-policy cache`.
"""

from __future__ import annotations

from vllm_dp_supervisor.kvcache.feed import Endpoints
from vllm_dp_supervisor.kvcache.routing import CacheRouting

__all__ = ["CacheRouting", "Endpoints"]
