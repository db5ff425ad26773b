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
batch of prompts, prompt embeddings, presence or frequency penalties, a chat with any content part
but text, an empty stop string (vLLM refuses it), and any request when the ranks run a reasoning
or tool parser or a gpt-oss model (settings: RouterSettings.resume). Where the cut falls, and what a
continuation must repeat: seam.py. `tests/unit/router/test_continuation.py` proves each shape exact
or refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vllm_dp_supervisor.router.policies.base import Routed

# What a continuation carries over from the request it continues (vLLM 0.32's CompletionRequest
# takes each of these as a chat request does); the rest is rebuilt or belongs to the first rank.
# repetition_penalty counts prompt and output tokens alike: the same after a cut.
SAMPLING = ("model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "length_penalty", "seed",
            "stop_token_ids", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
            "allowed_token_ids", "priority", "user", "cache_salt", "vllm_xargs", "include_stop_str_in_output",
            "watermarking")
# Present and not off (None, False, 0, 1 for n and best_of, "none" for tool_choice): not resumable.
# presence and frequency penalties, bad_words and repetition_detection: vLLM applies them to output
# tokens only, and after a cut the generated part is prompt: the continuation would forget it.
EXCLUDES = ("echo", "logprobs", "top_logprobs", "prompt_logprobs", "tools", "tool_choice", "functions",
            "function_call", "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
            "guided_grammar", "use_beam_search", "suffix", "prompt_embeds", "presence_penalty", "frequency_penalty",
            "bad_words", "repetition_detection")
# Chat content parts a continuation can carry: text only (an image, audio or video is not in the
# prompt's ids; the continuation would generate the rest blind).
TEXT_PARTS = frozenset({"text"})
# vLLM's (and OpenAI's) default max_tokens of a completion; a chat's is the rest of the context.
COMPLETIONS_MAX_TOKENS = 16
KINDS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}
INT64_MIN = -(1 << 63)  # vLLM's lowest priority value


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resumable request, as the router reads it once."""
    kind: str  # "chat" or "completions"
    request: dict[str, Any]
    wants_ids: bool  # the client asked for token ids itself: they stay in what it gets
    usage: bool  # stream_options.include_usage, or the ranks' --enable-force-include-usage
    continuous_usage: bool  # stream_options.continuous_usage_stats
    max_tokens: int | None  # None: until the model ends (a chat without a limit)
    min_tokens: int
    stops: tuple[str, ...]
    keep_stop: bool  # include_stop_str_in_output

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    def upstream_body(self) -> bytes:
        """The request as the first rank gets it: with token ids, without the stop strings (the
        router applies them, stop.py). Its usage options are the client's: asking the rank for a
        usage block the client did not ask for would move vLLM's system_fingerprint there, out of
        the final chunk the client reads."""
        body = {k: v for k, v in self.request.items() if k != "stop"}
        body["return_token_ids"] = True
        return json.dumps(body, separators=(",", ":")).encode()


def _off(key: str, value: Any) -> bool:
    if key in ("n", "best_of"):
        return value in (None, 1)
    if key == "tool_choice":
        return value in (None, "none")
    if key == "logprobs":  # a completion's logprobs: 0 asks for the sampled token's
        return value is None or value is False
    return value in (None, False, 0, 0.0, [], {})


def _text_only(messages: list[Any]) -> bool:
    """Every message's content is text (a string, or parts of type text)."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") not in TEXT_PARTS
                                             for p in content):
            return False
    return True


def plan(request: Routed, allowed: bool, force_usage: bool = False) -> Plan | None:
    """The request's plan if its stream can be continued on another rank, else None.
    `force_usage`: the ranks send a usage block to every stream (--enable-force-include-usage)."""
    kind = KINDS.get(request.path.rstrip(b"/"))
    if kind is None or not allowed or request.method != b"POST" or b'"stream"' not in request.body:
        return None
    return _plan(kind, request.json(), force_usage)


def _plan(kind: str, request: dict[str, Any] | None, force_usage: bool) -> Plan | None:
    if request is None or request.get("stream") is not True:
        return None
    if any(not _off(key, request.get(key)) for key in (*EXCLUDES, "n", "best_of")):
        return None
    if kind == "completions" and not _one_prompt(request.get("prompt")):
        return None
    if kind == "chat" and (not isinstance(request.get("messages"), list) or not _text_only(request["messages"])):
        return None
    if kind == "chat":  # vLLM's rule: max_completion_tokens unless null, then max_tokens
        limit = request.get("max_completion_tokens")
        limit = request.get("max_tokens") if limit is None else limit
    else:  # null or absent: vLLM's default of a completion
        limit = request.get("max_tokens")
        limit = COMPLETIONS_MAX_TOKENS if limit is None else limit
    stop = request.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) \
        else None
    options = request.get("stream_options")
    min_tokens = request.get("min_tokens") or 0
    if stops is None or not all(isinstance(s, str) and s for s in stops) or not isinstance(options, dict | None) \
            or not isinstance(limit, int | None) or isinstance(limit, bool) or not isinstance(min_tokens, int):
        return None  # malformed (an empty stop string too): the rank answers it with its own 400
    usage = force_usage or bool((options or {}).get("include_usage"))
    # vLLM's should_include_usage: usage in every chunk only with include_usage (or forced: then always)
    continuous = force_usage or (usage and bool((options or {}).get("continuous_usage_stats")))
    return Plan(kind, request, bool(request.get("return_token_ids")), usage, continuous, limit, min_tokens, stops,
                bool(request.get("include_stop_str_in_output")))


def _one_prompt(prompt: Any) -> bool:
    """A single prompt: a string, or one list of token ids (not a batch)."""
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return True
    return isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)


def against_defaults(plan: Plan, defaults: dict[str, Any] | str) -> str | None:
    """Why the model's generation defaults (what vLLM applies to a request that does not set it,
    kvcache/model_files.generation_defaults) make this plan inexact, or None: a default presence
    or frequency penalty is counted over output tokens only, which a continuation forgets."""
    if isinstance(defaults, str):
        return f"the model's generation defaults cannot be read ({defaults})"
    for key in ("presence_penalty", "frequency_penalty"):
        if plan.request.get(key) is None and defaults.get(key) not in (None, 0, 0.0):
            return f"the model's generation config sets {key} {defaults[key]}, which vLLM counts over output only"
    return None


def body(plan: Plan, prompt_ids: list[int], generated: list[int], context: int | None = None,
         ahead: bool = False, default_max: int | None = None, cap: int | None = None) -> bytes | None:
    """The /v1/completions request that generates the rest after `generated` (the tokens up to
    the point it continues from); None when nothing is left to generate (the limit was reached)
    or no limit can be set. `context`: the model's max_model_len, for a chat that set no limit
    (its limit is then the rest of the context, as vLLM's; a completion of ids would get 16).
    `default_max`: the model's generation config's max_new_tokens, which vLLM applies to a chat
    without a limit (the smaller of it and the rest of the context); `cap`: vLLM's
    override_max_tokens, which it applies to every request, an explicit limit included.
    `ahead`: the ranks schedule by priority (--scheduling-policy priority): the continuation gets
    one step more than the request had (vLLM: lower is earlier), so a client already reading is
    not queued behind requests of its own priority that came after it (seen without: 29.5-33 s
    on two saturated CPU ranks). vLLM's priority policy may preempt one of them for it."""
    limit = plan.max_tokens if plan.max_tokens is not None else None if context is None else context - len(prompt_ids)
    if plan.max_tokens is None and limit is not None and isinstance(default_max, int) and default_max > 0:
        limit = min(limit, default_max)
    if limit is not None and isinstance(cap, int) and cap > 0:
        limit = min(limit, cap)
    if limit is None or limit - len(generated) <= 0:
        return None
    body = {k: plan.request[k] for k in SAMPLING if k in plan.request}
    # explicit: absent, a rank would apply the model's default penalties (a plan has none of its own)
    body.update(presence_penalty=0, frequency_penalty=0)
    priority = body.get("priority", 0)
    if ahead and isinstance(priority, int) and not isinstance(priority, bool) and priority > INT64_MIN:
        body["priority"] = priority - 1
    options = {"include_usage": True, **({"continuous_usage_stats": True} if plan.continuous_usage else {})}
    body.update(prompt=[*prompt_ids, *generated], max_tokens=limit - len(generated),
                min_tokens=max(0, plan.min_tokens - len(generated)), stream=True, return_token_ids=True,
                stream_options=options)
    return json.dumps(body, separators=(",", ":")).encode()
