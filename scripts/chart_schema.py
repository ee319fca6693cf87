#!/usr/bin/env python3
"""Generate helm/gemmguard/values.schema.json from the annotated values.yaml.

Descriptions come from the helm-docs `# --` comments, defaults and types from the values
themselves, and the few constraints a value cannot show (enums, minimums, nullable types) from
CONSTRAINTS below. A mapping whose keys carry their own `# --` comments is a closed object
(additionalProperties: false); one documented only as a whole (resources, podSecurityContext, ...)
is a Kubernetes object passed through unchanged.

    python3 scripts/chart_schema.py           # rewrite the schema
    python3 scripts/chart_schema.py --check   # exit 1 if the schema is stale (tests/test_chart.py)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "gemmguard"

# What the values cannot say about themselves, keyed by dotted path.
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "replicaCount": {"minimum": 0},
    "image.digest": {"pattern": "^(sha256:[0-9a-f]{64})?$"},
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "engine.tensorParallelSize": {"minimum": 1},
    "engine.port": {"minimum": 1, "maximum": 65535},
    "engine.extraArgs": {"items": {"type": "string"}},
    "engine.env": {"items": {"type": "object"}},
    "engine.envFrom": {"items": {"type": "object"}},
    "gemmguard.selfcheckPolicy": {"enum": ["warn", "fallback", "fail"]},
    "gemmguard.denyKernels": {"items": {"type": "string", "minLength": 1}},
    "gemmguard.selfcheckRefusalLinger": {"minimum": 0},
    "gpu.resourceName": {"pattern": "^([a-z0-9.-]+/[a-z0-9.-]+)?$"},
    "gpu.count": {"type": ["integer", "null"], "minimum": 1},
    "gpu.deviceGroups": {"items": {"type": "integer", "minimum": 0}, "uniqueItems": True},
    "persistence.storageClass": {"type": ["string", "null"]},
    "persistence.accessModes": {
        "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
        "minItems": 1,
    },
    "persistence.size": {"pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"},
    "persistence.emptyDirSizeLimit": {"pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"},
    "shm.sizeLimit": {"pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"},
    "probes.startup.periodSeconds": {"minimum": 1},
    "probes.startup.failureThreshold": {"minimum": 1},
    "probes.startup.timeoutSeconds": {"minimum": 1},
    "probes.readiness.periodSeconds": {"minimum": 1},
    "probes.readiness.failureThreshold": {"minimum": 1},
    "probes.readiness.timeoutSeconds": {"minimum": 1},
    "probes.liveness.path": {"enum": ["/health", "/gemmguard/live"]},
    "probes.liveness.periodSeconds": {"minimum": 1},
    "probes.liveness.failureThreshold": {"minimum": 1},
    "probes.liveness.timeoutSeconds": {"minimum": 1},
    "terminationGracePeriodSeconds": {"minimum": 0},
    "service.type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "service.port": {"minimum": 1, "maximum": 65535},
    "podDisruptionBudget.maxUnavailable": {"type": ["integer", "string"], "minimum": 0},
    "autoscaling.minReplicas": {"minimum": 1},
    "autoscaling.maxReplicas": {"minimum": 1},
    "multiNode.size": {"minimum": 2},
    "multiNode.masterPort": {"minimum": 1, "maximum": 65535},
    "prometheusRule.runbookUrl": {"format": "uri", "pattern": "^https?://"},
}

# A Prometheus duration, as a rule's `for:` takes it.
DURATION = {"pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}

# Rules across keys, as JSON-schema if/then (helm checks the merged values against them).
_SINGLE_WRITER = {"contains": {"enum": ["ReadWriteOnce", "ReadWriteOncePod"]}}


def _switch(value: bool) -> dict[str, Any]:
    return {"properties": {"enabled": {"const": value}}, "required": ["enabled"]}


_ON_SINGLE_WRITER_CLAIM = {
    "persistence": {
        "properties": {"enabled": {"const": True}, "accessModes": _SINGLE_WRITER},
        "required": ["enabled", "accessModes"],
    }
}
CROSS_CONSTRAINTS: list[dict[str, Any]] = [
    {
        "description": "An HPA above one replica cannot share a ReadWriteOnce claim: set "
        "persistence.accessModes to [ReadWriteMany] (a class that offers it) or "
        "autoscaling.maxReplicas to 1.",
        "if": {
            "properties": {
                "autoscaling": _switch(True),
                **_ON_SINGLE_WRITER_CLAIM,
            },
            "required": ["autoscaling", "persistence"],
        },
        "then": {"properties": {"autoscaling": {"properties": {"maxReplicas": {"maximum": 1}}}}},
    },
    {
        "description": "Several replicas cannot share a ReadWriteOnce claim: set "
        "persistence.accessModes to [ReadWriteMany] or replicaCount to 1.",
        "if": {
            "properties": {
                "autoscaling": _switch(False),
                **_ON_SINGLE_WRITER_CLAIM,
            },
            "required": ["autoscaling", "persistence"],
        },
        "then": {"properties": {"replicaCount": {"maximum": 1}}},
    },
    {
        "description": "The pods of a multi-node group run on different nodes and cannot share a "
        "ReadWriteOnce claim: set persistence.accessModes to [ReadWriteMany].",
        "if": {
            "properties": {
                "multiNode": _switch(True),
                **_ON_SINGLE_WRITER_CLAIM,
            },
            "required": ["multiNode", "persistence"],
        },
        "then": False,
    },
]

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(\s|$)")
_DOC = re.compile(r"^(?P<indent> *)# -- ?(?P<text>.*)$")
_MORE = re.compile(r"^(?P<indent> *)#(?: (?P<text>.*))?$")


def read_docs(text: str) -> dict[str, str]:
    """Map each dotted key path to its `# --` description (continuation `#` lines joined)."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    pending_indent = -1
    for line in text.splitlines():
        if m := _DOC.match(line):
            pending, pending_indent = [m["text"].strip()], len(m["indent"])
            continue
        if pending is not None and (m := _MORE.match(line)) and len(m["indent"]) == pending_indent:
            pending.append((m["text"] or "").strip())
            continue
        if m := _KEY.match(line):
            indent = len(m["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m["key"]))
            if pending is not None and indent == pending_indent:
                docs[".".join(k for _, k in stack)] = " ".join(t for t in pending if t)
        if not line.lstrip().startswith("#"):
            pending = None
    return docs


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise ValueError(f"no JSON type for {value!r}")


def build(values: dict[str, Any], docs: dict[str, str], path: str = "") -> dict[str, Any]:
    """Schema of the mapping `values` at `path`: one property per key, closed to other keys."""
    props: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{path}{key}"
        if dotted not in docs:
            raise SystemExit(
                f"values.yaml key '{dotted}' has no '# --' comment: every key needs one "
                "(helm-docs style)."
            )
        children = isinstance(value, dict) and any(f"{dotted}.{k}" in docs for k in value)
        if children:
            prop = {
                "description": docs[dotted],
                **build(value, docs, f"{dotted}."),
                "default": value,
            }
        else:
            constraint = CONSTRAINTS.get(dotted, {})
            if value is None and "type" not in constraint:
                raise SystemExit(
                    f"values.yaml key '{dotted}' is null: give its type in CONSTRAINTS."
                )
            prop = {"description": docs[dotted], "type": None if value is None else _type_of(value)}
            prop.update(constraint)
            prop["default"] = value
        props[key] = prop
    return {"type": "object", "additionalProperties": False, "properties": props}


def render() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    docs = read_docs(text)
    for alert in values["prometheusRule"]["alertFor"]:
        CONSTRAINTS[f"prometheusRule.alertFor.{alert}"] = DURATION
    for key in CONSTRAINTS:
        if key not in docs:
            raise SystemExit(f"CONSTRAINTS names '{key}', which values.yaml does not have.")
    docs.setdefault(
        "global", "Values Helm shares with parent and sub-charts; unused by this chart."
    )
    schema = build(values, docs)
    # Helm passes `global` to every chart that is a dependency of another one.
    schema["properties"]["global"] = {
        "description": docs["global"],
        "type": "object",
        "default": {},
    }
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "gemmguard chart values",
        "description": (
            "Generated from values.yaml by scripts/chart_schema.py: edit values.yaml, rerun it."
        ),
        **schema,
        "allOf": CROSS_CONSTRAINTS,
    }
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if values.schema.json is stale.")
    args = parser.parse_args()
    target = CHART / "values.schema.json"
    schema = render()
    if args.check:
        if not target.exists() or target.read_text() != schema:
            print(
                f"{target} is stale: run `python3 scripts/chart_schema.py` and commit the result.",
                file=sys.stderr,
            )
            return 1
        return 0
    target.write_text(schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
