"""``kustomize build`` for the shipped kustomizations, in Python, so tests run offline.

It covers what config/k8s uses (``resources``: files and directories, ``images``) and refuses
any other field, so a kustomization that grows a feature this builder lacks fails loudly
instead of being built wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images"}


def build(directory: Path) -> list[dict[str, Any]]:
    return build_file(directory / "kustomization.yaml")


def build_file(path: Path) -> list[dict[str, Any]]:
    """The documents of the kustomization at ``path``, as ``kustomize build`` gives them."""
    directory = path.parent
    kustomization = yaml.safe_load(path.read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this builder lacks: {unknown}")
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        target = (directory / resource).resolve()
        if target.is_dir():
            if directory.resolve().is_relative_to(target):
                raise ValueError(f"{directory}: {resource} contains it (kustomize: a cycle)")
            docs += build(target)
        else:
            docs += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                if _image_name(container["image"]) == image["name"]:
                    container["image"] = _new_image(image)
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    found: list[dict[str, Any]] = spec.get("containers", []) + spec.get("initContainers", [])
    return found


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def _new_image(image: dict[str, str]) -> str:
    name = image.get("newName", image["name"])
    if "digest" in image:
        return f"{name}@{image['digest']}"
    return f"{name}:{image['newTag']}" if "newTag" in image else name
