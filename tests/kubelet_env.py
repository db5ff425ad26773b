"""The environment the kubelet gives a pod for the Services of its namespace, unless the pod sets
`enableServiceLinks: false`, as pkg/kubelet/envvars/envvars.go writes it (Docker-links style)."""

from __future__ import annotations

from collections.abc import Iterable


def service_links(name: str, cluster_ip: str, ports: Iterable[tuple[str | None, int, str]]) -> dict[str, str]:
    """The variables for a Service `name` at `cluster_ip` with `ports` ((port name, port, protocol))."""
    prefix = name.upper().replace("-", "_")
    ports = list(ports)
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0][1])}
    for port_name, port, proto in ports:
        if port_name:
            env[f"{prefix}_SERVICE_PORT_{port_name.upper().replace('-', '_')}"] = str(port)
        url, head = f"{proto.lower()}://{cluster_ip}:{port}", f"{prefix}_PORT_{port}_{proto.upper()}"
        env.update({head: url, f"{head}_PROTO": proto.lower(), f"{head}_PORT": str(port), f"{head}_ADDR": cluster_ip})
    env[f"{prefix}_PORT"] = f"{ports[0][2].lower()}://{cluster_ip}:{ports[0][1]}"
    return env


# The Services the manifests shipped before they were renamed: what crashed every rank (issue 35).
OLD_SERVICES = {**service_links("vllm", "10.96.0.12", [("http", 8000, "TCP")]),
                **service_links("vllm-supervisor", "10.96.0.13", [("supervisor", 9256, "TCP")]),
                **service_links("supervisor", "10.96.0.14", [("http", 9256, "TCP")])}
