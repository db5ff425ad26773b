"""Custom resources (PodMonitor, PrometheusRule, LeaderWorkerSet, InferencePool) validated offline
against their CRDs' schemas, kept in tests/crds (see its README for where each comes from).

A CRD's openAPIV3Schema is OpenAPI 3's subset of JSON Schema; jsonschema checks it once it is made
strict the way `kubectl apply --validate=strict` is: an object schema with `properties` rejects a
field it does not list, unless it allows more (`additionalProperties`,
`x-kubernetes-preserve-unknown-fields`). CEL rules (`x-kubernetes-validations`) are not run.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "crds"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → the strict schema of that version."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.iterdir()):
        if not path.name.endswith((".yaml", ".yaml.gz")):
            continue
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        crd = yaml.load(text, Loader=Loader)
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            found[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return found


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which objects take only the fields they list."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    nested = ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not")
    out = {k: strict(v) if k in nested else v for k, v in schema.items()
           if not k.startswith("x-kubernetes-") or k == "x-kubernetes-preserve-unknown-fields"}
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def custom_kinds() -> set[str]:
    return {kind for _, kind in schemas()}


def validate(doc: dict[str, Any]) -> list[str]:
    """The schema's complaints about one custom resource, as sentences; ["no CRD ..."] when its
    apiVersion and kind have no CRD here."""
    schema = schemas().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if schema is None:
        return [f"{name}: no CRD for {doc.get('apiVersion')} {doc.get('kind')} in tests/crds"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{name}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
