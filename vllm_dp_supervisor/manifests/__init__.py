"""Kubernetes manifests checked against the supervisor they run (`vllm-dp-supervisor
check-manifests`): the GPU count, rank ports, probes and stop budget are written by hand in several
places of a manifest, and this keeps a user's own copy from drifting.

Contract: reads rendered objects only; never contacts a cluster, never starts a rank. May import
the settings (to parse a container's configuration as the supervisor would), the API (its routes)
and the loops' stop constants; nothing imports it but the command line.
"""

from vllm_dp_supervisor.manifests.cli import main
from vllm_dp_supervisor.manifests.rules import problems

__all__ = ["main", "problems"]
