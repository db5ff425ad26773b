"""Where the model's tokenizer and chat template are, found as vLLM finds them but offline: a
local directory, or a Hugging Face hub id already in the hub cache (vLLM downloads it while its
rank starts; the router looks again once a rank is ready). Never downloads, never imports vLLM
or transformers. Standard library only.

vLLM 0.32 reads: the tokenizer from `--tokenizer` (else the model) at `--tokenizer-revision`
(else `--revision`), the hub cache at `--download-dir` (else HF_HUB_CACHE, HF_HOME/hub,
XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); the chat template from
`--chat-template` (a file, or the template itself), else the tokenizer's `chat_template.jinja`,
else `chat_template` in its `tokenizer_config.json` (one, or a named set: "default", or
"tool_use" when the request has tools). The generation defaults vLLM applies to a request that
does not set them (`generation_defaults`): `--generation-config` ("auto": the model's
`generation_config.json`; "vllm": none; else a directory's), updated by
`--override-generation-config`, as vLLM 0.32's `ModelConfig.get_diff_sampling_param`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_dp_supervisor.settings.config import ModelSource

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ModelFilesError(Exception):
    """Why the tokenizer or the template cannot be had (one line)."""


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    directory: Path
    tokenizer_json: Path
    templates: Mapping[str, str]  # name → template ("default", maybe "tool_use"); empty: none
    special_tokens: Mapping[str, Any]  # what a template reads: bos_token, eos_token, ...

    def template(self, tools: bool) -> str | None:
        if tools and "tool_use" in self.templates:
            return self.templates["tool_use"]
        return self.templates.get("default")


def hub_caches(environ: Mapping[str, str], download_dir: str | None) -> list[Path]:
    if download_dir:
        return [Path(download_dir)]
    if environ.get("HF_HUB_CACHE"):
        return [Path(environ["HF_HUB_CACHE"])]
    if environ.get("HF_HOME"):
        return [Path(environ["HF_HOME"]) / "hub"]
    xdg = environ.get("XDG_CACHE_HOME")
    return [Path(xdg) / "huggingface" / "hub" if xdg else Path.home() / ".cache" / "huggingface" / "hub"]


def model_directory(name: str, revision: str | None, caches: list[Path]) -> Path:
    if Path(name).is_dir():
        return Path(name)
    if name.count("/") != 1 or name.startswith(("/", ".")):
        raise ModelFilesError(f"{name} is not a directory")
    for cache in caches:
        repo = cache / f"models--{name.replace('/', '--')}"
        wanted = revision or "main"
        if re.fullmatch(r"[0-9a-f]{40}", wanted):
            commit = wanted
        else:
            try:
                commit = (repo / "refs" / wanted).read_text().strip()
            except OSError:
                continue
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
    raise ModelFilesError(f"{name} is not in the hub cache yet ({', '.join(map(str, caches))})")


def _token_text(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value


def _templates(directory: Path, config: Mapping[str, Any], given: str | None) -> dict[str, str]:
    if given is not None:
        try:
            return {"default": Path(given).read_text()}
        except OSError:
            if not any(c in given for c in "{}\n"):
                raise ModelFilesError(f"--chat-template {given}: no such file") from None
            return {"default": given}
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return {"default": jinja.read_text()}
    found = config.get("chat_template")
    if isinstance(found, str):
        return {"default": found}
    if isinstance(found, list):
        return {t["name"]: t["template"] for t in found if isinstance(t, dict) and isinstance(t.get("template"), str)}
    return {}


def _json_file(path: Path) -> dict[str, Any]:
    """A JSON file's object: {} when there is no such file or it holds no object."""
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{path}: {exc}") from None
    return loaded if isinstance(loaded, dict) else {}


def find(where: ModelSource, environ: Mapping[str, str]) -> ModelFiles:
    """The files, or ModelFilesError saying why not."""
    directory = model_directory(where.tokenizer or where.model, where.revision, hub_caches(environ, where.download_dir))
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelFilesError(f"{directory} has no tokenizer.json (a fast tokenizer's file)")
    config = _json_file(directory / "tokenizer_config.json")
    special: dict[str, Any] = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
    special["additional_special_tokens"] = [_token_text(t) for t in extra] if isinstance(extra, list) else []
    return ModelFiles(directory, tokenizer_json, _templates(directory, config, where.chat_template), special)


# What vLLM 0.32 takes from a generation config as a request's defaults (get_diff_sampling_param).
GENERATION_PARAMS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                     "min_p", "max_new_tokens")


def _generation_file(directory: Path) -> dict[str, Any]:
    """A directory's generation config; without one, transformers derives it from config.json."""
    path = directory / "generation_config.json"
    return _json_file(path if path.is_file() else directory / "config.json")


def generation_defaults(where: ModelSource, environ: Mapping[str, str]) -> dict[str, Any]:
    """The sampling defaults vLLM applies to a request that does not set them, under vLLM's names
    (`max_new_tokens` as `max_tokens`), and `override_max_tokens`, the cap vLLM's servers put on
    every request, an explicit max_tokens included (when --generation-config names a directory,
    or --override-generation-config sets max_new_tokens); ModelFilesError when the model's files
    cannot be read. vLLM reads the model's own file through transformers, from the default hub
    cache, never --download-dir (which holds the weights only)."""
    source = where.generation_config or "auto"
    if source == "vllm":
        config: dict[str, Any] = {}
    elif source == "auto":
        config = _generation_file(model_directory(where.model, where.model_revision, hub_caches(environ, None)))
    else:
        config = _generation_file(Path(source))
    override: dict[str, Any] = {}
    if where.override_generation_config:
        try:
            loaded = json.loads(where.override_generation_config)
        except ValueError as exc:
            raise ModelFilesError(f"--override-generation-config: {exc}") from None
        override = loaded if isinstance(loaded, dict) else {}
    config.update(override)
    found = {name: config[name] for name in GENERATION_PARAMS if config.get(name) is not None}
    if "max_new_tokens" in found:
        found["max_tokens"] = found.pop("max_new_tokens")
    cap = found.get("max_tokens") if source not in ("auto", "vllm") else override.get("max_new_tokens")
    return {**found, **({"override_max_tokens": cap} if cap is not None else {})}
