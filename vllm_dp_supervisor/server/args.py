"""The few things the supervisor must know from the server arguments after `--`, read as vLLM reads them.

vLLM's parser (its `FlexibleArgumentParser`, 0.32) accepts `--name value` and `--name=value`,
underscores for dashes (`--tensor_parallel_size`), short aliases also with `=` (`-tp=2`), and
`--config FILE.yaml`, whose keys become flags placed before the command line's own (so the
command line wins). Reading only `-tp 2` would silently give a rank the wrong number of GPUs.

Pure but for the --config file, which is read through the function given. Never imports vLLM,
never changes the arguments: the ranks get them exactly as written.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


class ServerArgsError(ValueError):
    """Arguments vLLM would refuse, or the supervisor cannot run correctly. One line."""


# vLLM's short aliases of the flags the supervisor reads or sets (engine/arg_utils.py).
ALIASES = {
    "-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size", "-dp": "--data-parallel-size",
    "-dpn": "--data-parallel-rank", "-dpr": "--data-parallel-start-rank", "-dpl": "--data-parallel-size-local",
    "-dpa": "--data-parallel-address", "-dpp": "--data-parallel-rpc-port",
}
# vLLM's --api-key takes one or more keys (nargs="+"); any of them is accepted.
API_KEY = "--api-key"
API_KEY_ENV = "VLLM_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    """What the supervisor reads from the servers' arguments. Built by `read_server_args`."""
    flags: tuple[tuple[str, str | None], ...] = ()  # (canonical --flag, value or None), in order
    # The key a client must send, when the ranks require one: never shown, never logged.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    positional: str | None = None  # `vllm serve MODEL ...`: the model, when given first
    served_names: tuple[str, ...] = ()  # --served-model-name's values (nargs="+"), the last one given

    @property
    def model(self) -> str | None:
        """The model the ranks serve: the first argument (`vllm serve MODEL`), else --model (vLLM's
        serve: a positional model takes precedence)."""
        return self.positional or self.value("--model")

    def value(self, flag: str) -> str | None:
        """The last value given to `flag` (vLLM's last occurrence wins)."""
        found = None
        for name, value in self.flags:
            if name == flag:
                found = value
        return found

    def present(self, flag: str) -> bool:
        return any(name == flag for name, _ in self.flags)

    def _required_value(self, flag: str) -> str | None:
        text = self.value(flag)
        if text is None and self.present(flag):
            raise ServerArgsError(f"server argument {flag} needs a value")
        return text

    def positive_int(self, flag: str, default: int) -> int:
        text = self._required_value(flag)
        if text is None:
            return default
        if not re.fullmatch(r"\s*\+?[0-9]{1,9}\s*", text) or int(text) < 1:
            raise ServerArgsError(f"server argument {flag} must be a positive integer, got {text!r}")
        return int(text)

    def seconds(self, flag: str) -> float | None:
        text = self._required_value(flag)
        if text is None:
            return None
        try:
            return float(text)
        except ValueError:
            raise ServerArgsError(f"server argument {flag} must be a number of seconds, got {text!r}") from None

    @property
    def devices_per_rank(self) -> int:
        return self.positive_int("--tensor-parallel-size", 1) * self.positive_int("--pipeline-parallel-size", 1)

    @property
    def fault_tolerance(self) -> bool:
        return self.present("--enable-fault-tolerance")


def canonical(arg: str) -> tuple[str, str | None]:
    """('--tensor-parallel-size', '2') for '-tp=2', ('--max-model-len', None) for '--max_model_len'."""
    name, eq, inline = arg.partition("=")
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
    name = ALIASES.get(name, name)
    return name, inline if eq else None


def read_server_args(args: Sequence[str], environ: Mapping[str, str],
                     read_text: Callable[[str], str] = lambda p: Path(p).read_text()) -> ServerArgs:
    """`environ`: the environment the ranks get (VLLM_API_KEY there counts like --api-key)."""
    expanded = _expand_config(list(args), read_text)
    flags: list[tuple[str, str | None]] = []
    keys: list[str] = []
    names: list[str] = []
    for i, arg in enumerate(expanded):
        if not arg.startswith("-") or _is_number(arg):
            continue
        name, value = canonical(arg)
        if value is None and i + 1 < len(expanded) and not _looks_like_flag(expanded[i + 1]):
            value = expanded[i + 1]
        flags.append((name, value))
        if name == API_KEY:
            # nargs="+": every value up to the next flag; the last --api-key wins
            keys = [value or ""] if "=" in arg else _values_after(expanded, i)
        elif name == "--served-model-name":
            names = [value or ""] if "=" in arg else _values_after(expanded, i)
    key = next((k for k in keys if k), None) or environ.get(API_KEY_ENV) or None
    positional = args[0] if args and not args[0].startswith("-") else None
    return ServerArgs(tuple(flags), key, positional, tuple(n for n in names if n))


def _values_after(args: Sequence[str], i: int) -> list[str]:
    values = []
    for arg in args[i + 1:]:
        if _looks_like_flag(arg):
            break
        values.append(arg)
    return values


def _is_number(arg: str) -> bool:
    return re.fullmatch(r"-[0-9.]+(e-?[0-9]+)?", arg) is not None


def _looks_like_flag(arg: str) -> bool:
    return arg.startswith("-") and not _is_number(arg) and arg != "-"


def _expand_config(args: list[str], read_text: Callable[[str], str]) -> list[str]:
    """`--config FILE` replaced by the flags its YAML keys stand for, before the other flags."""
    configs = [i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")]
    if not configs:
        return args
    if len(configs) > 1:
        raise ServerArgsError("server argument --config is given more than once (vLLM refuses that)")
    i = configs[0]
    if args[i] == "--config":
        if i + 1 >= len(args):
            raise ServerArgsError("server argument --config needs a file")
        path, rest = args[i + 1], args[:i] + args[i + 2:]
    else:
        path, rest = args[i].partition("=")[2], args[:i] + args[i + 1:]
    # After the leading positionals (the model), as vLLM inserts them: the command line still wins.
    lead = next((j for j, a in enumerate(rest) if a.startswith("-")), len(rest))
    return rest[:lead] + _config_flags(path, read_text) + rest[lead:]


def _config_flags(path: str, read_text: Callable[[str], str]) -> list[str]:
    if not path.endswith((".yaml", ".yml")):
        raise ServerArgsError(f"server argument --config {path}: vLLM reads only .yaml or .yml files")
    try:
        import yaml
    except ImportError:  # vLLM depends on PyYAML, and so do we; say so if it is missing anyway
        raise ServerArgsError("reading the server's --config file needs PyYAML (pip install pyyaml)") from None
    try:
        data: Any = yaml.safe_load(read_text(path))
    except OSError as exc:
        raise ServerArgsError(f"server argument --config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ServerArgsError(f"server argument --config {path}: not valid YAML{where}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ServerArgsError(f"server argument --config {path}: the YAML must be a mapping of option names")
    flags: list[str] = []
    for key, value in data.items():  # as vLLM's load_config_file turns them into flags
        flag = f"--{key}"
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, list):
            flags += [flag, *map(str, value)] if value else []
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags
