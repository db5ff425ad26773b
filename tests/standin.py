"""A stand-in for `vllm serve`: standard library only, starts in ~30 ms.

Speaks GET /health, GET /v1/models (with max_model_len), POST /detokenize, POST /v1/completions and
/v1/chat/completions (with
`"stream": true`, SSE chunks like vLLM's, one every --standin-stream-delay s, from the
deterministic model of standin_model.py: token ids, prompts as token ids, stop strings, usage), and /echo (any
method: what it received, as JSON; `?status=N` answers with that status). Every answer carries
`X-Standin-Rank`. With vLLM's `--kv-events-config` it keeps a prefix cache of its prompts'
blocks and publishes its KV events as vLLM does (standin_cache.py; `vllm:prefix_cache_*` on
/metrics). Like vLLM, with `--api-key K...` (or
VLLM_API_KEY) every /v1/* request needs `Authorization: Bearer <one of them>`, else 401.
Like vLLM's API server it forks an
"engine" child that does not die when its parent is SIGKILLed, and on SIGTERM/SIGINT it stops the
engine and exits 0. Accepts (and ignores) any vLLM flag; its own behaviour flags start with
--standin- and apply to the ranks listed in --standin-ranks (default: all; the model's shape,
--standin-stream-*, to every rank), read from
SUPERVISOR_LOCAL_RANK.

Usage: python standin.py MODEL [--standin-...] --host H --port P
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standin_model as model


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="standin-model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", nargs="+", default=None, help="(vLLM's flag) keys that /v1/* requires")
    p.add_argument("--standin-require-key", default=None,
                   help="/v1/* requires this key, which the supervisor cannot know (a misconfiguration)")
    p.add_argument("--standin-ranks", default=None, help="comma list of ranks the flags below apply to")
    p.add_argument("--standin-load-seconds", type=float, default=0.0, help="sleep before listening")
    p.add_argument("--standin-exit-at-start", type=int, default=None,
                   help="print an error and exit with this code at once (a bad flag)")
    p.add_argument("--standin-exit-if-restarted", default=None, metavar="DIR",
                   help="exit 2 at start if DIR says this rank started before (a new version that fails)")
    p.add_argument("--standin-crash-after", type=float, default=None, help="exit N s after listening")
    p.add_argument("--standin-crash-code", type=int, default=3)
    p.add_argument("--standin-unhealthy-after", type=float, default=None,
                   help="answer /health with --standin-unhealthy-status after N s")
    p.add_argument("--standin-unhealthy-status", type=int, default=500)
    p.add_argument("--standin-engine-dead-after", type=float, default=None,
                   help="its engine dies N s after listening, as vLLM 0.32's does: /health answers 503 and "
                        "every completion 500 with EngineDeadError's message; the server stays up")
    p.add_argument("--standin-hang-after", type=float, default=None,
                   help="stop answering /health (hang) after N s")
    p.add_argument("--standin-hang-completions-after", type=float, default=None,
                   help="completions never answer after N s, while /health stays 200 (a stuck engine)")
    p.add_argument("--standin-hang-spins", action="store_true",
                   help="a hung completion spins a core meanwhile (a collective stuck busy-waiting)")
    p.add_argument("--standin-busy-first-token", type=float, default=0.0,
                   help="seconds of CPU work before a stream's first chunk, its token counters still "
                        "(vLLM's first logprobs pass on the CPU build)")
    p.add_argument("--enable-fault-tolerance", action="store_true",
                   help="(vLLM's flag) serve /fault_tolerance/status and /fault_tolerance/apply")
    p.add_argument("--standin-ft-fault-after", type=float, default=None,
                   help="the engine faults (status unhealthy) N s after listening")
    p.add_argument("--standin-ft-dead", action="store_true", help="the fault is fatal (status dead)")
    p.add_argument("--standin-ft-recovery", choices=["works", "fails", "hangs"], default="works",
                   help="what a retry does: heal in 0.3 s, fail with ft_error, or never finish")
    p.add_argument("--standin-ready-stamp", default=None,
                   help="directory: write <port> there, holding time.time(), the moment it listens")
    p.add_argument("--standin-port-plus-local-rank", action="store_true",
                   help="listen on --port + $LOCAL_RANK (for torchrun, which sets LOCAL_RANK)")
    p.add_argument("--standin-unicode", action="store_true",
                   help="the model writes kana, CJK, emoji and accented letters, 2-4 byte tokens each")
    p.add_argument("--standin-busy", action="store_true",
                   help="its token counters grow at every /metrics read, as under real traffic")
    p.add_argument("--standin-ignore-sigterm", action="store_true", help="server and engine ignore SIGTERM/SIGINT")
    p.add_argument("--standin-engine-ignore-sigterm", action="store_true", help="only the engine ignores them")
    p.add_argument("--standin-no-engine", action="store_true")
    p.add_argument("--standin-traceback-at-start", action="store_true",
                   help="raise an exception with a traceback at start")
    p.add_argument("--standin-shm", default=None,
                   help="the engine creates and maps /dev/shm/<this> (vLLM's psm_* segments); {rank}: its rank")
    p.add_argument("--standin-chatty", type=int, default=0, help="print N lines at start")
    p.add_argument("--standin-json-line", action="store_true", help="print a JSON log line at start")
    p.add_argument("--standin-guard-metrics", action="store_true",
                   help="/metrics needs the API key too (vLLM's does not; a proxy in front of it may)")
    p.add_argument("--standin-metrics-hang", action="store_true", help="/metrics never answers")
    p.add_argument("--standin-partial-line", default=None,
                   help="once listening, write this to stderr without a newline")
    p.add_argument("--standin-garbage", type=int, default=0,
                   help="write N bytes of binary garbage (invalid UTF-8, NULs) to stdout at start")
    p.add_argument("--standin-daemon-seconds", type=float, default=None,
                   help="double-fork a process that leaves the process group (setsid), lives N s, exits")
    p.add_argument("--standin-daemon-clear-env", action="store_true",
                   help="the daemon execs with an empty environment (it carries no tag of the run)")
    p.add_argument("--standin-semaphore", action="store_true",
                   help="like vLLM, make a multiprocessing (spawn) lock: a /dev/shm/sem.mp-* file that "
                        "only multiprocessing's resource tracker knows; its name goes to stdout")
    p.add_argument("--standin-stream-chunks", type=int, default=5,
                   help="tokens of a streamed answer (unless max_tokens ends it sooner; a completion's default is 16)")
    p.add_argument("--standin-stream-delay", type=float, default=0.0, help="seconds between SSE chunks")
    p.add_argument("--standin-stream-pad", type=int, default=0, help="bytes of padding in each SSE chunk")
    p.add_argument("--standin-die-mid-stream", type=int, default=None,
                   help="the server dies (exit 3) after sending N chunks of a stream")
    p.add_argument("--standin-abort-mid-stream", type=int, default=None,
                   help="after N tokens a stream ends with a finish_reason 'abort' chunk and [DONE], as "
                        "vLLM's server does when its engine dies and it aborts what runs (the server stays up)")
    p.add_argument("--standin-done-mid-stream", type=int, default=None,
                   help="after N tokens a stream ends with [DONE] and no finish_reason, as vLLM's server "
                        "once did when its EngineCore was SIGKILLed (the server stays up)")
    p.add_argument("--standin-die-before-done", action="store_true",
                   help="the server dies (exit 3) after a stream's last token, before its [DONE]")
    p.add_argument("--standin-completion-delay", type=float, default=0.0,
                   help="seconds a non-streamed completion takes (its token counters grow meanwhile)")
    p.add_argument("--standin-first-token-delay", type=float, default=0.0,
                   help="seconds before a stream's first chunk: a long prefill (its token counters grow meanwhile)")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="(vLLM's flag) usage tells the prompt tokens the prefix cache hit")
    p.add_argument("--kv-events-config", default=None, help="(vLLM's flag) publish KV events (standin_cache.py)")
    p.add_argument("--standin-block-size", type=int, default=16, help="tokens per prefix-cache block")
    p.add_argument("--standin-cache-blocks", type=int, default=64, help="blocks the prefix cache holds")
    p.add_argument("--standin-kv-silent", action="store_true", help="keep a prefix cache but publish no events")
    p.add_argument("--standin-kv-skip", default="", help="comma list of KV event batch numbers never sent")
    p.add_argument("--standin-kv-buffer", type=int, default=None, help="batches kept for replay")
    p.add_argument("--standin-prefill-per-token", type=float, default=0.0,
                   help="seconds of prefill per prompt token the cache did not hold")
    args, _unknown = p.parse_known_args(argv)
    if args.standin_ranks is not None:
        mine = os.environ.get("SUPERVISOR_LOCAL_RANK")
        if mine not in args.standin_ranks.split(","):
            # the model's shape is the same on every rank (as one checkpoint's is): only faults differ
            keep = {"model", "host", "port", "standin_ranks", "enable_fault_tolerance", "api_key",
                    "standin_stream_chunks", "standin_stream_delay", "standin_stream_pad", "kv_events_config",
                    "standin_block_size", "standin_cache_blocks", "standin_prefill_per_token", "standin_unicode",
                    "enable_prompt_tokens_details"}
            defaults = p.parse_args([])
            for key, value in vars(defaults).items():
                if key not in keep:
                    setattr(args, key, value)
    return args


def run_engine(ignore_term: bool, shm_name: str | None) -> None:
    """The grandchild: holds 'GPU memory' until told to stop. Survives its parent's SIGKILL."""
    if shm_name:
        import mmap
        shm_name = shm_name.replace("{rank}", os.environ.get("SUPERVISOR_LOCAL_RANK", "0"))
        fd = os.open(f"/dev/shm/{shm_name}", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 1 << 20)
        segment = mmap.mmap(fd, 1 << 20)  # noqa: F841 (kept mapped for the process's life)
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    while True:
        time.sleep(3600)


def main() -> None:
    args = parse(sys.argv[1:])
    rank = os.environ.get("SUPERVISOR_LOCAL_RANK", "0")
    if args.standin_unicode:
        model.use_unicode()
    for i in range(args.standin_chatty):
        print(f"standin line {i}", flush=False)
    if args.standin_json_line:  # a line as a rank started with JSON logging writes it
        print(json.dumps({"levelname": "WARNING", "message": "standin json line", "name": "standin"}), flush=False)
    sys.stdout.flush()
    if args.standin_garbage:
        sys.stdout.buffer.write(bytes((i * 7 + 0xF5) % 256 for i in range(args.standin_garbage)) + b"\n")
        sys.stdout.flush()
    if args.standin_traceback_at_start:
        print("INFO loading the model", file=sys.stderr)
        raise ValueError("bad model config: hidden_size must be divisible by heads")
    if args.standin_exit_at_start is not None:
        print("standin: error: argument --max-model-len: invalid int value", file=sys.stderr)
        sys.exit(args.standin_exit_at_start)
    if args.standin_exit_if_restarted is not None:
        marker = os.path.join(args.standin_exit_if_restarted, f"started-{rank}")
        if os.path.exists(marker):
            print("standin: error: the new model revision does not load", file=sys.stderr)
            sys.exit(2)
        open(marker, "w").close()

    if args.standin_daemon_seconds is not None and os.fork() == 0:
        os.setsid()  # out of the rank's process group: only the subreaper can catch it
        if os.fork() == 0:
            print(f"standin daemon {os.getpid()}", flush=True)
            if args.standin_daemon_clear_env:
                sleep = f"import time; time.sleep({args.standin_daemon_seconds})"
                os.execve(sys.executable, [sys.executable, "-c", sleep], {})
            time.sleep(args.standin_daemon_seconds)
        os._exit(0)

    lock = None
    if args.standin_semaphore:
        import multiprocessing
        lock = multiprocessing.get_context("spawn").Lock()  # registered with a resource tracker
        print(f"standin semaphore /dev/shm/sem.{lock._semlock.name.lstrip('/')}", flush=True)

    engine_pid = None
    if not args.standin_no_engine:
        engine_pid = os.fork()
        if engine_pid == 0:
            run_engine(args.standin_ignore_sigterm or args.standin_engine_ignore_sigterm, args.standin_shm)
            os._exit(0)

    def stop(signum: int, _frame: object) -> None:
        if args.standin_ignore_sigterm:
            return
        if engine_pid:
            try:
                os.kill(engine_pid, signal.SIGTERM)
                os.waitpid(engine_pid, 0)  # blocks forever if the engine ignores SIGTERM
            except (ProcessLookupError, ChildProcessError):
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.standin_load_seconds:
        time.sleep(args.standin_load_seconds)

    cache = None
    if args.kv_events_config:
        import standin_cache
        config = json.loads(args.kv_events_config)
        if args.standin_kv_silent:
            config = {**config, "endpoint": "inproc://silent", "replay_endpoint": None}
        if config.get("enable_kv_cache_events") and config.get("publisher") == "zmq":
            cache = standin_cache.PrefixCache(config, args.standin_block_size, args.standin_cache_blocks,
                                              frozenset(int(s) for s in args.standin_kv_skip.split(",") if s),
                                              args.standin_kv_buffer)

    started = time.monotonic()
    tokens = [0]
    running = [0]  # completions being answered now
    stored: dict[str, dict] = {}  # the Responses API's store: in this process only, as vLLM's
    completions = [0]
    unauthorized = [0]
    chunks_sent = [0]
    streams_aborted = [0]
    # vLLM's engine status as /fault_tolerance/status shows it (EngineCoreSentinel._push_status)
    engine = {"id": int(os.environ.get("SUPERVISOR_LOCAL_RANK", "0")), "status": "healthy"}
    recovered_at = [None]

    def engine_status() -> dict:
        fault_at = args.standin_ft_fault_after
        if fault_at is not None and since() >= fault_at and engine["status"] == "healthy" \
                and recovered_at[0] is None:
            engine.update(status="dead" if args.standin_ft_dead else "unhealthy", fault_info="RuntimeError")
        if recovered_at[0] is not None and time.monotonic() >= recovered_at[0] and engine["status"] == "unhealthy":
            engine["status"] = "healthy"
            engine.pop("fault_info", None)
        return {"schema_version": 1, "total_engines": 1, "engines": [dict(engine)]}

    engine_step = threading.Lock()

    def since() -> float:
        return time.monotonic() - started

    def engine_dead() -> bool:
        return args.standin_engine_dead_after is not None and since() >= args.standin_engine_dead_after

    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if k]
    if args.standin_require_key:
        keys = [args.standin_require_key]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall

        def _authorized(self) -> bool:
            """vLLM's AuthenticationMiddleware: only /v1 (and /v2, ...) is guarded."""
            if not keys or not self.path.startswith("/v1"):
                return True
            scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and given in keys:
                return True
            unauthorized[0] += 1
            self._send(401, {"error": "Unauthorized"})
            return False

        def log_message(self, *a: object) -> None:
            pass

        def _send(self, code: int, body: dict | str) -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Standin-Rank", rank)
            self.end_headers()
            self.wfile.write(data)

        def _respond(self, request: dict) -> None:
            """A stored response whose text says which rank made it and after which response."""
            previous = request.get("previous_response_id")
            if previous is not None and previous not in stored:
                self._not_found(previous)
                return
            rid = f"resp_{os.getpid()}_{len(stored)}"
            stored[rid] = {"id": rid, "object": "response", "status": "completed", "model": args.model,
                           "previous_response_id": previous, "output": [{"type": "message", "role": "assistant",
                           "content": [{"type": "output_text", "text": f"rank {rank} after {previous}"}]}]}
            self._send(200, stored[rid])

        def _not_found(self, rid: str) -> None:
            self._send(404, {"error": {"message": f"Response with id '{rid}' not found.",
                                       "type": "invalid_request_error", "param": "response_id", "code": 404}})

        def _echo(self, body: bytes) -> None:
            query = self.path.partition("?")[2]
            status = int(dict(q.partition("=")[::2] for q in query.split("&") if q).get("status", 200))
            self._send(status, {"method": self.command, "path": self.path, "rank": rank,
                                "headers": [[k, v] for k, v in self.headers.items()],
                                "body_sha256": hashlib.sha256(body).hexdigest(), "body_bytes": len(body)})

        def _stream(self, request: dict, chat: bool, details: dict | None = None) -> None:
            """vLLM's streamed answer from the deterministic model (standin_model.events): chunked
            SSE, an event every --standin-stream-delay s, then [DONE]."""
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{os.getpid()}-{completions[0]}",
                    "created": int(time.time()), "model": request.get("model") or args.model,
                    "object": "chat.completion.chunk" if chat else "text_completion"}
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Standin-Rank", rank)
            self.end_headers()
            spin(args.standin_busy_first_token)
            prefill(args.standin_first_token_delay)
            tokens_sent = 0
            try:
                for event in model.events(request, chat, args.standin_stream_chunks, head,
                                          {"rank": rank, "pad": "x" * args.standin_stream_pad}, details):
                    token = bool(event["choices"]) and "role" not in event["choices"][0].get("delta", {})
                    if token and tokens_sent == args.standin_die_mid_stream:
                        os._exit(3)
                    if token and tokens_sent == args.standin_done_mid_stream:
                        break  # straight to [DONE]: no finish_reason, no error
                    if token and tokens_sent == args.standin_abort_mid_stream:
                        piece = {"delta": {"content": ""}} if chat else {"text": ""}
                        self._event({**head, "choices": [{"index": 0, **piece, "token_ids": [],
                                                          "finish_reason": "abort", "stop_reason": None}]})
                        break
                    self._event(event)
                    if token:
                        tokens_sent += 1
                        chunks_sent[0] += 1
                        tokens[0] += 1  # a generated token, as vllm:generation_tokens_total counts it
                        time.sleep(args.standin_stream_delay)
                if args.standin_die_before_done:
                    os._exit(3)
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                streams_aborted[0] += 1  # the client (the router) went away: vLLM aborts the request
                raise

        def _event(self, event: dict) -> None:
            self._chunk(f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode())

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            self.wfile.flush()

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.startswith("/echo"):
                self._echo(b"")
            elif self.path == "/health":
                if engine_dead():
                    self._send(503, "")
                    return
                if args.standin_hang_after is not None and since() >= args.standin_hang_after:
                    time.sleep(3600)
                if args.standin_unhealthy_after is not None and since() >= args.standin_unhealthy_after:
                    print(f"standin: engine dead, answering {args.standin_unhealthy_status}",
                          file=sys.stderr, flush=True)
                    self._send(args.standin_unhealthy_status, {"error": "unhealthy"})
                    return
                self._send(200, "")
            elif self.path == "/fault_tolerance/status" and args.enable_fault_tolerance:
                self._send(200, engine_status())
            elif self.path == "/metrics":
                if args.standin_busy:
                    tokens[0] += 100
                if args.standin_guard_metrics and keys and \
                        (self.headers.get("Authorization") or "") not in [f"Bearer {k}" for k in keys]:
                    unauthorized[0] += 1
                    self._send(401, {"error": "Unauthorized"})
                    return
                if args.standin_metrics_hang:
                    time.sleep(3600)
                labels = f'engine="0",model_name="{args.model}"'  # vLLM 0.32's labels
                self._send(200, "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                                "# TYPE vllm:num_requests_running gauge\n"
                                f"vllm:num_requests_running{{{labels}}} {running[0]}.0\n"
                                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                                "# TYPE vllm:num_requests_waiting gauge\n"
                                f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
                                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                                f"vllm:kv_cache_usage_perc{{{labels}}} {min(running[0], 10) / 10}\n"
                                "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                                "# TYPE vllm:generation_tokens_total counter\n"
                                f"vllm:generation_tokens_total{{{labels}}} {tokens[0]}.0\n"
                                "# HELP python_gc_objects_collected_total Objects collected during gc\n"
                                "# TYPE python_gc_objects_collected_total counter\n"
                                'python_gc_objects_collected_total{generation="0"} 1.0\n'
                                "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of "
                                "number of queried tokens.\n# TYPE vllm:prefix_cache_queries_total counter\n"
                                f"vllm:prefix_cache_queries_total{{{labels}}} {cache.queries if cache else 0}.0\n"
                                "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of "
                                "cached tokens.\n# TYPE vllm:prefix_cache_hits_total counter\n"
                                f"vllm:prefix_cache_hits_total{{{labels}}} {cache.hits if cache else 0}.0\n"
                                f"standin_kv_batches_total {cache.batches if cache else 0}\n"
                                f"standin_completions_total {completions[0]}\n"
                                f"standin_unauthorized_total {unauthorized[0]}\n"
                                f"standin_stream_chunks_sent_total {chunks_sent[0]}\n"
                                f"standin_streams_aborted_total {streams_aborted[0]}\n")
            elif self.path.startswith("/v1/responses/"):
                rid = self.path.split("/")[3].split("?")[0]
                if rid in stored:
                    self._send(200, stored[rid])
                else:
                    self._not_found(rid)
            elif self.path == "/is_sleeping":  # vLLM's (under VLLM_SERVER_DEV_MODE)
                self._send(200, {"is_sleeping": False})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": args.model, "object": "model",
                                                             "max_model_len": model.MAX_MODEL_LEN}]})
            else:
                self._send(404, {"error": "not found"})

        do_PUT = do_DELETE = do_PATCH = lambda self: self.do_POST()

        def do_HEAD(self) -> None:
            self._send(200, {"head": True})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if not self._authorized():
                return
            if self.path.startswith("/echo"):
                self._echo(body)
                return
            if self.path == "/fault_tolerance/apply" and args.enable_fault_tolerance:
                if json.loads(body or b"{}").get("instruction") != "retry":
                    self._send(400, {"error": "Invalid instruction"})
                    return
                state = engine_status()["engines"][0]["status"]
                print(f"standin: fault tolerance retry received (engine {state})", file=sys.stderr, flush=True)
                if state == "unhealthy":
                    if args.standin_ft_recovery == "works":
                        recovered_at[0] = time.monotonic() + 0.3
                    elif args.standin_ft_recovery == "fails":
                        engine["ft_error"] = "collective op failed during retry"
                self._send(202, {"message": "Request accepted; poll /fault_tolerance/status for updates."})
                return
            if self.path == "/v1/responses":  # vLLM's, with VLLM_ENABLE_RESPONSES_API_STORE=1
                self._respond(json.loads(body or b"{}"))
                return
            if self.path.split("?")[0] == "/reset_prefix_cache":  # vLLM's (under VLLM_SERVER_DEV_MODE)
                if cache is not None:
                    cache.clear()  # vLLM publishes AllBlocksCleared too
                self._send(200, {"success": True})
                return
            if self.path == "/detokenize":  # vLLM's: the token ids' text, as its tokenizer decodes them
                self._send(200, {"prompt": model.detokenize(json.loads(body or b"{}").get("tokens") or [])})
                return
            if self.path in ("/v1/completions", "/v1/chat/completions"):
                running[0] += 1
                try:
                    self._complete(body)
                finally:
                    running[0] -= 1
                return
            self._send(404, {"error": "not found"})

        def _complete(self, body: bytes) -> None:
            completions[0] += 1
            with engine_step:  # a step of the engine's under way (spin) finishes first
                pass
            if engine_dead():  # vLLM's engine_error_handler: OpenAI's error JSON, status 500
                self._send(500, {"error": {"message": "EngineCore encountered an issue. See stack trace (above) "
                                           "for the root cause.", "type": "InternalServerError", "param": None,
                                           "code": 500}})
                return
            if args.standin_hang_completions_after is not None and since() >= args.standin_hang_completions_after:
                spin(3600) if args.standin_hang_spins else time.sleep(3600)
            tokens[0] += 1
            request = json.loads(body or b"{}")
            chat = self.path == "/v1/chat/completions"
            hit, prompt = 0, []
            if isinstance(request, dict):
                prompt = model.chat_prompt(request.get("messages")) if chat else \
                    model.completion_prompt(request.get("prompt"))
            if cache is not None and isinstance(request, dict):
                hit = cache.admit(prompt)
                prefill((len(prompt) - hit) * args.standin_prefill_per_token)
            details = {"prompt_tokens_details": {"cached_tokens": hit}} if args.enable_prompt_tokens_details else None
            if isinstance(request, dict) and request.get("stream"):
                self._stream(request, chat, details)
                return
            prefill(args.standin_completion_delay)
            usage = {"usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + 1,
                               "completion_tokens": 1, **details}} if details else {}
            if not chat:
                self._send(200, {"object": "text_completion", "model": args.model,
                                 "choices": [{"index": 0, "text": " Paris", "finish_reason": "length"}], **usage})
            else:
                self._send(200, {"object": "chat.completion", "model": args.model,
                                 "choices": [{"index": 0, "finish_reason": "stop", "message":
                                              {"role": "assistant", "content": "Hello from the stand-in."}}],
                                 **usage})

    def spin(seconds: float) -> None:
        """Work a core for `seconds`, counting no token, in a process below the server as vLLM's
        engine works below its API server (the supervisor's judge reads the engine's CPU there).
        Other completions wait meanwhile, as they would for vLLM's engine step."""
        if seconds > 0:
            with engine_step:
                subprocess.run([sys.executable, "-c", "import time\nend = time.monotonic() + float(__import__('sys')"
                                ".argv[1])\nwhile time.monotonic() < end: pass", str(seconds)], check=False)

    def prefill(seconds: float) -> None:
        """Work without output: the engine's token counters grow, as vLLM's do in chunked prefill."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
            tokens[0] += 16

    if args.standin_port_plus_local_rank:
        args.port += int(os.environ.get("LOCAL_RANK", "0"))
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.standin_ready_stamp:
        stamp = os.path.join(args.standin_ready_stamp, str(args.port))
        with open(stamp + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(stamp + ".tmp", stamp)
    if args.standin_partial_line is not None:
        sys.stderr.write(args.standin_partial_line)
        sys.stderr.flush()
    server.daemon_threads = True
    if args.standin_crash_after is not None:
        def crash() -> None:
            time.sleep(args.standin_crash_after)
            print(f"standin: crashing with code {args.standin_crash_code}", file=sys.stderr, flush=True)
            os._exit(args.standin_crash_code)
        threading.Thread(target=crash, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
