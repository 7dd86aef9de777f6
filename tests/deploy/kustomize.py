"""Renders the kustomizations in ``deploy/kubernetes`` as ``kubectl kustomize`` would, for the
subset of kustomize they use: ``resources`` (files and other kustomizations), ``labels``
(metadata only), ``images`` and JSON 6902 ``patches`` aimed by kind and name. Anything else is
refused, so a kustomization that grows past this subset fails the tests instead of being
rendered wrongly. (No kustomize or Helm binary can be had on these machines.)"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "labels", "images", "patches"}


class UnsupportedKustomization(ValueError):
    pass


def render(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - SUPPORTED
    if unsupported:
        raise UnsupportedKustomization(f"{directory}: {sorted(unsupported)}")
    manifests: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            manifests += render(path)
        else:
            manifests += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for label_set in spec.get("labels", []):
        if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
            raise UnsupportedKustomization("labels on selectors or templates")
        for manifest in manifests:
            manifest["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    for image in spec.get("images", []):
        for container in _containers(manifests):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = (f"{image.get('newName', name)}:"
                                      f"{image.get('newTag', tag)}")
    for patch in spec.get("patches", []):
        target = patch["target"]
        matches = [m for m in manifests if m["kind"] == target["kind"]
                   and m["metadata"]["name"] == target["name"]]
        if len(matches) != 1:
            raise UnsupportedKustomization(f"patch target {target} matches {len(matches)}")
        for operation in yaml.safe_load(patch["patch"]):
            _apply(matches[0], operation)
    return manifests


def _containers(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for m in manifests if m["kind"] == "Deployment"
            for c in m["spec"]["template"]["spec"]["containers"]]


def _apply(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on ``document``."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~")
                      for p in operation["path"].lstrip("/").split("/")]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    op = operation["op"]
    if op in ("replace", "remove") and (key not in node if isinstance(node, dict)
                                        else key >= len(node)):
        raise KeyError(f"{operation['path']} does not exist")
    if op == "remove":
        del node[key]
    elif op == "replace":
        node[key] = copy.deepcopy(operation["value"])
    elif op == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(operation["value"]))
        else:
            node[key] = copy.deepcopy(operation["value"])
    else:
        raise UnsupportedKustomization(f"patch op {op}")
