"""The continuation: a stream that outlives its rank. Which streams may (`plan`), the request
their first rank gets (`Plan.upstream_body`), and the request that asks another rank for the rest
(`body`). Pure: a request in, the bodies to send (stream.py reads and writes the stream; the
passage, passage.py, runs a continuation when its stream is cut, whatever cut it: the rank died,
was killed as hung, or was handed off by a planned stop).

A streamed chat or completion with one choice (`plan`) is sent to its rank with
"return_token_ids": true, so vLLM 0.32 tells the router the prompt's token ids (in a chat's first
chunk, in a completion's first choice) and each chunk's generated ids. If the rank dies, the rest
of the generation is asked of another rank as a `/v1/completions` whose prompt is those ids
(`continuation`): vLLM adds no special token to a prompt of ids, so a greedy request continues
exactly where it was cut. Its sampling parameters go with it; its stop strings stay with the
router, which applies them to the whole text the way vLLM's detokenizer does (stop.py): a stop
string that straddles the cut still stops the answer.

Not resumable, and left as they were (docs/router.md says why): n > 1, best_of, beam search, echo,
logprobs and prompt logprobs, tools and tool choice, structured output, a completion's suffix, a
batch of prompts, prompt embeddings, and any request when the ranks run a reasoning or tool parser.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vllm_dp_supervisor.router.policies.base import Routed

# What a continuation carries over from the request it continues (vLLM 0.32's CompletionRequest
# takes each of these as a chat request does); the rest is rebuilt or belongs to the first rank.
SAMPLING = ("model", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "length_penalty", "seed", "stop_token_ids", "ignore_eos", "skip_special_tokens",
            "spaces_between_special_tokens", "logit_bias", "allowed_token_ids", "bad_words", "priority", "user",
            "cache_salt", "vllm_xargs", "repetition_detection")
# Present and not off (None, False, 0, 1 for n and best_of, "none" for tool_choice): not resumable.
EXCLUDES = ("echo", "logprobs", "top_logprobs", "prompt_logprobs", "tools", "tool_choice", "functions",
            "function_call", "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
            "guided_grammar", "use_beam_search", "suffix", "prompt_embeds")
# vLLM's (and OpenAI's) default max_tokens of a completion; a chat's is the rest of the context.
COMPLETIONS_MAX_TOKENS = 16
KINDS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resumable request, as the router reads it once."""
    kind: str  # "chat" or "completions"
    request: dict[str, Any]
    wants_ids: bool  # the client asked for token ids itself: they stay in what it gets
    usage: bool  # stream_options.include_usage
    max_tokens: int | None  # None: until the model ends (a chat without a limit)
    min_tokens: int
    stops: tuple[str, ...]
    keep_stop: bool  # include_stop_str_in_output

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    def upstream_body(self) -> bytes:
        """The request as the first rank gets it: with token ids, without the stop strings (the
        router applies them, stop.py)."""
        body = {k: v for k, v in self.request.items() if k not in ("stop", "include_stop_str_in_output")}
        body["return_token_ids"] = True
        return json.dumps(body, separators=(",", ":")).encode()


def _off(key: str, value: Any) -> bool:
    if key in ("n", "best_of"):
        return value in (None, 1)
    if key == "tool_choice":
        return value in (None, "none")
    return value in (None, False, 0, [], {})


def plan(request: Routed, allowed: bool) -> Plan | None:
    """The request's plan if its stream can be continued on another rank, else None."""
    kind = KINDS.get(request.path.rstrip(b"/"))
    if kind is None or not allowed or request.method != b"POST" or b'"stream"' not in request.body:
        return None
    return _plan(kind, request.json())


def _plan(kind: str, request: dict[str, Any] | None) -> Plan | None:
    if request is None or request.get("stream") is not True:
        return None
    if any(not _off(key, request.get(key)) for key in (*EXCLUDES, "n", "best_of")):
        return None
    if kind == "completions" and not _one_prompt(request.get("prompt")):
        return None
    if kind == "chat" and not isinstance(request.get("messages"), list):
        return None
    limit = request.get("max_completion_tokens", request.get("max_tokens")) if kind == "chat" else \
        request.get("max_tokens", COMPLETIONS_MAX_TOKENS)
    stop = request.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) \
        else None
    options = request.get("stream_options")
    min_tokens = request.get("min_tokens") or 0
    if stops is None or not all(isinstance(s, str) for s in stops) or not isinstance(options, dict | None) or \
            not isinstance(limit, int | None) or isinstance(limit, bool) or not isinstance(min_tokens, int):
        return None  # malformed: the rank answers it with its own 400
    return Plan(kind, request, bool(request.get("return_token_ids")), bool((options or {}).get("include_usage")),
                limit, min_tokens, tuple(s for s in stops if s), bool(request.get("include_stop_str_in_output")))


def _one_prompt(prompt: Any) -> bool:
    """A single prompt: a string, or one list of token ids (not a batch)."""
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return True
    return isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)


def body(plan: Plan, prompt_ids: list[int], generated: list[int]) -> bytes | None:
    """The /v1/completions request that generates the rest; None when nothing is left to
    generate (the limit was reached)."""
    left = None if plan.max_tokens is None else plan.max_tokens - len(generated)
    if left is not None and left <= 0:
        return None
    body = {k: plan.request[k] for k in SAMPLING if k in plan.request}
    body.update(prompt=[*prompt_ids, *generated], max_tokens=left, min_tokens=max(0, plan.min_tokens - len(generated)),
                stream=True, return_token_ids=True, stream_options={"include_usage": True})
    return json.dumps(body, separators=(",", ":")).encode()
