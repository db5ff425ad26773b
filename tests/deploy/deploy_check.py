"""Render the repository's overlays for the deploy tests; the check itself is the package's own
`vllm-dp-supervisor check-manifests` (vllm_dp_supervisor/manifests/), which users run on
their copies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vllm_dp_supervisor.manifests import problems

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
check = problems
__all__ = ["BIN", "ROOT", "check", "render"]


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
