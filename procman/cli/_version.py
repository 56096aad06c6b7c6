"""``llamactl --version``: the release, and which llama-server build it carries."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["installed_lines", "version_lines"]


def version_lines(manifest: dict[str, Any] | None, dist_version: str | None) -> list[str]:
    """What ``--version`` prints, from the bundled build manifest and the installed version.

    The variant comes from the manifest, not from the version's label: ``pip
    install .`` makes a wheel without a label, and the server inside is what
    the user needs to know about.
    """
    from buildtools.variant import DIST_NAME, variant_from_manifest  # speed

    lines = [f"{DIST_NAME} {dist_version or 'unknown (not installed)'}"]
    if manifest is None:
        lines.append(
            "llama-server: none bundled (a development install); "
            "`llamactl builds` shows the one serve would use"
        )
        return lines
    plan = manifest.get("plan", {})
    label = variant_from_manifest(manifest)
    lines.append(
        f"llama-server: {manifest.get('version', 'unknown')}, variant {label}, "
        f"build {manifest.get('key', '?')} (backend {plan.get('backend', 'cpu')})"
    )
    if variant := manifest.get("cpu_variant"):
        lines.append(f"  CPU variant picked where it was verified: {variant}")
    if features := plan.get("cpu_features"):
        lines.append(f"  needs CPU features: {', '.join(features)}")
    return lines


def installed_lines() -> list[str]:
    from buildtools.variant import DIST_NAME  # speed
    from buildtools.wheel import bundled_manifest  # speed

    try:
        dist = version(DIST_NAME)
    except PackageNotFoundError:
        dist = None
    return version_lines(bundled_manifest(), dist)
