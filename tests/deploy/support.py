"""Helpers of the deploy/ tests: YAML loading, a small kustomize, PromQL metric names, exported names."""

from __future__ import annotations

import copy
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from workers.runtime import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "eventfleet.json"

Doc = dict[str, Any]

#: Kinds that are not namespaced (kustomize leaves their namespace alone).
CLUSTER_SCOPED = {"Namespace"}


def load_docs(path: pathlib.Path) -> list[Doc]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d]


def key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def kustomization(directory: pathlib.Path) -> Doc:
    doc: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
    return doc


def resource_files(directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """The manifest files a kustomization lists, recursively (directories are kustomizations)."""
    for entry in kustomization(directory).get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            yield from resource_files(path)
        else:
            yield path


# --- a small kustomize: enough for what deploy/k8s uses, checked against `kubectl kustomize` ---


def compose(directory: pathlib.Path) -> list[Doc]:
    """Render a kustomization: resources, patches, namespace, labels, images (in kustomize's order)."""
    k = kustomization(directory)
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs.extend(compose(path) if path.is_dir() else copy.deepcopy(load_docs(path)))
    for patch in k.get("patches", []):
        for doc in patch_targets(directory, patch, docs):
            apply_patch(directory, patch, doc)
    for doc in docs:
        if "namespace" in k and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = k["namespace"]
        for label in k.get("labels", []):
            assert not label.get("includeSelectors"), "not modelled"
            assert not label.get("includeTemplates"), "not modelled"
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
        for container in containers(doc):
            for image in k.get("images", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def patch_targets(directory: pathlib.Path, patch: Doc, docs: list[Doc]) -> list[Doc]:
    """The documents a patch entry applies to: its target selector, or the kind+name of its file."""
    if "target" in patch:
        target = patch["target"]
        return [
            d for d in docs
            if d["kind"] == target["kind"]
            and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
            and d["apiVersion"].split("/")[0] == target.get("group", d["apiVersion"].split("/")[0])
        ]
    body = load_docs(directory / patch["path"])[0]
    return [d for d in docs if key(d) == key(body) and d["apiVersion"] == body["apiVersion"]]


def apply_patch(directory: pathlib.Path, patch: Doc, doc: Doc) -> None:
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text("utf-8")
    body = yaml.safe_load(text)
    if isinstance(body, list):  # JSON 6902
        for op in body:
            *parents, last = [p for p in op["path"].split("/") if p]
            node: Any = doc
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            assert op["op"] in ("replace", "add"), f"op {op['op']} not modelled"
            if op["op"] == "replace":
                assert last in node, f"replace of a missing path {op['path']}"
            node[last] = op["value"]
    else:  # strategic merge
        merge(doc, body)


def merge(into: Doc, patch: Doc) -> None:
    """Strategic merge as used here: maps merge, lists of named maps merge by name, others replace."""
    for name, value in patch.items():
        old = into.get(name)
        if isinstance(old, dict) and isinstance(value, dict):
            merge(old, value)
        elif isinstance(old, list) and isinstance(value, list) and all(
            isinstance(v, dict) and "name" in v for v in old + value
        ):
            by_name = {item["name"]: item for item in old}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    old.append(item)
        else:
            into[name] = copy.deepcopy(value)


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- PromQL and metric names ---

_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or durations)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations, $__range
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        if text[match.end():].lstrip().startswith("("):  # a function call
            continue
        if match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def exported_series_names() -> dict[str, str]:
    """Every series name workers.metrics exposes -> its metric type (histograms: bucket/count/sum)."""
    names: dict[str, str] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase | metrics.BatchHistogram):
            continue
        for family in value.describe():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                        "gauge": ("",), "summary": ("", "_count", "_sum")}[family.type]
            for suffix in suffixes:
                names[family.name + suffix] = family.type
    return names


#: Series every Prometheus synthesizes for a scrape target.
SYNTHETIC = {"up"}


def alert_rules() -> list[Doc]:
    return [rule for group in yaml.safe_load(ALERTS.read_text("utf-8"))["groups"] for rule in group["rules"]]
