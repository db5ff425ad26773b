"""preflight.py's checks that need no port or process: what --otlp-traces-endpoint needs."""

from __future__ import annotations

import importlib.util

import pytest

from vllm_dp_supervisor import preflight
from vllm_dp_supervisor.settings.config import ConfigError
from vllm_dp_supervisor.settings.options import parse_config

TRACED = parse_config(["--dp-size-local", "1", "--otlp-traces-endpoint", "localhost:4317"], {})


def test_tracing_is_checked_only_when_asked_for_and_passes_with_the_packages_installed():
    preflight.check_tracing(parse_config(["--dp-size-local", "1"], {}), {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "x"})
    preflight.check_tracing(TRACED, {})
    preflight.check_tracing(TRACED, {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})


def test_tracing_without_opentelemetry_says_which_extra_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'vllm-dp-supervisor\[otel\]'"):
        preflight.check_tracing(TRACED, {})


def test_tracing_with_a_protocol_vllm_does_not_take_is_refused():
    with pytest.raises(ConfigError, match="must be grpc or http/protobuf"):
        preflight.check_tracing(TRACED, {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})
