"""`vllm-dp-supervisor check-manifests SOURCE`: read manifests, print every disagreement the rules
find, exit 0 (agree), 1 (disagree) or 2 (unreadable input). Reads only what it is given (a file,
standard input, or a kustomization directory it renders with `kubectl kustomize`)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_dp_supervisor.manifests.rules import WORKLOADS, problems
from vllm_dp_supervisor.settings.config import PROG

AGREE, DISAGREE, UNREADABLE = 0, 1, 2


class UnreadableManifests(Exception):
    """The input is not manifests this tool can read; the message says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} check-manifests",
        description="Check that Kubernetes manifests agree with the supervisor they run: GPU count, "
                    "rank ports, probes, stop budget, /dev/shm, Services and InferencePool target ports.",
        epilog="Exit codes: 0 they agree, 1 they do not (each disagreement printed), 2 unreadable input. "
               "Example: kubectl kustomize deploy/overlays/replicas | vllm-dp-supervisor check-manifests -")
    parser.add_argument("source", help="a rendered manifest file (YAML or JSON), - for standard input, "
                                       "or a kustomization directory (rendered with kubectl kustomize)")
    return parser


def _render(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise UnreadableManifests(f"{directory} is a directory, and rendering it needs kubectl on PATH "
                                  "(or pipe `kustomize build` into `check-manifests -`)")
    try:
        out = subprocess.run([kubectl, "kustomize", str(directory)], check=False, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise UnreadableManifests(f"kubectl kustomize {directory} did not finish in 120 s") from None
    if out.returncode != 0:
        raise UnreadableManifests(f"kubectl kustomize {directory} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def _documents(text: str) -> list[Any]:
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except ValueError:
        pass
    import yaml  # a dependency (vLLM's --config is YAML too); imported only when the input is not JSON
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise UnreadableManifests(f"not valid YAML: {exc}") from None


def load(source: str) -> list[dict[str, Any]]:
    """The Kubernetes objects in `source`; a `kind: List`'s items are unpacked."""
    path = Path(source)
    try:
        if source == "-":
            text = sys.stdin.read()
        elif path.is_dir():
            text = _render(path)
        else:
            text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableManifests(f"cannot read {source}: {exc}") from None
    objects: list[dict[str, Any]] = []
    for doc in _documents(text):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc:
            raise UnreadableManifests(f"not a Kubernetes object (no kind): {str(doc)[:80]}")
        objects.extend(doc.get("items") or [] if doc["kind"].endswith("List") else [doc])
    if not objects:  # an empty pipe: the render before it failed
        raise UnreadableManifests(f"no Kubernetes object in {'standard input' if source == '-' else source}")
    return objects


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        objects = load(args.source)
        found = problems(objects)
    except UnreadableManifests as exc:
        print(f"{PROG} check-manifests: {exc}", file=sys.stderr)
        return UNREADABLE
    except (KeyError, TypeError, AttributeError) as exc:  # an object missing what its kind must have
        print(f"{PROG} check-manifests: malformed object ({type(exc).__name__}: {exc})", file=sys.stderr)
        return UNREADABLE
    for problem in found:
        print(problem)
    workloads = sum(1 for o in objects if o.get("kind") in WORKLOADS)
    print(f"{len(found)} disagreement(s) in {len(objects)} object(s), {workloads} workload(s)", file=sys.stderr)
    return DISAGREE if found else AGREE
