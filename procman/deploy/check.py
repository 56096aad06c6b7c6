"""``llamactl deploy k8s --check DIR``: the rendered manifests, validated offline.

No API server is needed: core kinds are checked against the official JSON
schemas of each Kubernetes version asked for, in their strict variants (an
unknown field is an error, as ``kubectl apply --validate=strict`` makes it),
with the ``kubernetes-validate`` package; a LeaderWorkerSet against the
``openAPIV3Schema`` of its CustomResourceDefinition (``--lws-crd``, the file
kubernetes-sigs/lws publishes under ``config/crd/bases/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procman.errors import ConfigError

__all__ = ["VERSIONS", "Problem", "check_dir", "check_object", "lws_schema"]

#: the Kubernetes versions a rendering is checked against by default
VERSIONS = ("1.30", "1.37")


@dataclass(frozen=True)
class Problem:
    """One object that does not validate."""

    file: str
    what: str
    version: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what} (Kubernetes {self.version}): {self.message}"


def lws_schema(crd: Path) -> dict[str, Any]:
    """The ``v1`` schema inside a LeaderWorkerSet CustomResourceDefinition file."""
    import yaml  # speed

    try:
        doc = yaml.safe_load(crd.read_text(encoding="utf-8"))
        for version in doc["spec"]["versions"]:
            if version["name"] == "v1":
                return dict(version["schema"]["openAPIV3Schema"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the LeaderWorkerSet CRD {crd}: {exc}") from exc
    raise ConfigError(f"{crd} has no v1 LeaderWorkerSet schema")


def check_object(doc: dict[str, Any], version: str, lws: dict[str, Any] | None) -> str | None:
    """Why ``doc`` is not valid for Kubernetes ``version`` (None: it is)."""
    import jsonschema  # speed
    import kubernetes_validate  # speed

    if doc.get("kind") == "LeaderWorkerSet":
        if lws is None:
            return None  # checked only where the CRD is given (see check_dir)
        try:
            jsonschema.validate(doc, lws)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            return f"{where}: {exc.message}"
        return None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"{where}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"
    return None


def check_dir(
    directory: Path, versions: Sequence[str] = VERSIONS, lws_crd: Path | None = None
) -> tuple[int, list[Problem], list[str]]:
    """Every object in ``directory``'s ``*.yaml``: (objects checked, problems, notes)."""
    import yaml  # speed

    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(
            f"no .yaml files in {directory}",
            hint="render them: llamactl deploy k8s --config models.toml --image IMG --out DIR",
        )
    lws = lws_schema(lws_crd) if lws_crd is not None else None
    problems: list[Problem] = []
    notes: list[str] = []
    count = 0
    for file in files:
        try:
            docs = [d for d in yaml.safe_load_all(file.read_text(encoding="utf-8")) if d]
        except yaml.YAMLError as exc:
            problems.append(Problem(file.name, "the file", "-", f"not YAML: {exc}"))
            continue
        for doc in docs:
            count += 1
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                problems.append(Problem(file.name, "a document", "-", "no kind/apiVersion"))
                continue
            what = f"{doc['kind']} {doc.get('metadata', {}).get('name', '?')}"
            if doc["kind"] == "LeaderWorkerSet" and lws is None:
                notes.append(f"{file.name}: {what} not checked (pass --lws-crd FILE)")
            for version in versions:
                message = check_object(doc, version, lws)
                if message is not None:
                    problems.append(Problem(file.name, what, version, message))
    return count, problems, notes
