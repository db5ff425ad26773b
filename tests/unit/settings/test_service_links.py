"""service_links.py: the kubelet's service-link variables that a rank or the supervisor would read
as a setting are found; nothing else is. Pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from kubelet_env import service_links

from vllm_dp_supervisor.settings.service_links import injected, service_env_prefix


def test_a_service_named_vllm_or_supervisor_gives_variables_that_are_removed():
    env = {**service_links("vllm", "10.96.0.12", [("http", 8000, "TCP"), (None, 8001, "UDP")]),
           **service_links("supervisor", "10.96.0.14", [("http", 9256, "TCP")])}
    assert injected(env) == sorted(env)  # with the rest of each Service's links (none is a vLLM setting)
    assert {"VLLM_PORT", "VLLM_SERVICE_HOST", "VLLM_SERVICE_PORT_HTTP", "VLLM_PORT_8001_UDP_ADDR",
            "SUPERVISOR_PORT"} <= set(injected(env))


def test_only_the_services_whose_link_is_a_uri_lose_their_links():
    env = {"VLLM_SERVICE_HOST": "10.0.0.1", **service_links("vllm-dp", "10.0.0.2", [("h", 80, "TCP")])}
    assert "VLLM_SERVICE_HOST" not in injected(env) and "VLLM_DP_SERVICE_HOST" in injected(env)


def test_settings_a_user_gives_and_other_services_links_are_left():
    env = {"VLLM_PORT": "8000", "SUPERVISOR_PORT": "9000", "VLLM_HOST_IP": "10.0.0.1",
           "VLLM_LOGGING_CONFIG_PATH": "tcp://x:1", "VLLM_SOME_URL": "http://a:1",
           **service_links("llm", "10.96.0.12", [("http", 8000, "TCP")])}
    assert injected(env) == []


@given(st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True), st.integers(1, 65535),
       st.sampled_from(["TCP", "UDP", "SCTP"]))
def test_any_service_s_uri_links_are_found_exactly_when_its_name_is_under_a_prefix_the_pod_reads(name, port, proto):
    env = service_links(name, "10.0.0.7", [("p", port, proto)])
    expected = sorted(env) if service_env_prefix(name).startswith(("VLLM_", "SUPERVISOR_")) else []
    assert injected({**env, "VLLM_HOST_IP": "10.0.0.1", "VLLM_SERVICE_HOSTS": "x"}) == expected
