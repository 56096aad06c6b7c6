"""A directory of wheels laid out as one simple index (PEP 503) per variant.

llama-cpp-python publishes ``/whl/cpu``, ``/whl/cu124``, ``/whl/metal``: the
user picks a backend with ``--extra-index-url`` and pip picks the wheel for
their platform from it. The wheelhouse does the same::

    wheelhouse/
      index.html                           links to the variants (for people)
      cpu/index.html                       the simple index: one link per project
      cpu/llamactl-server/index.html       one link per wheel, with #sha256=
      cpu/llamactl-server/llamactl_server-0.1.0+cpu.portable-py3-none-manylinux_2_36_x86_64.whl
      cu130/...

``pip install --extra-index-url file:///srv/wheelhouse/cpu llamactl-server``
(or ``https://host/wheelhouse/cpu``: any static file server) then installs the
CPU variant. Only wheels built to be shared go in: a portable build (the
label ends in ``.portable``), repaired to a manylinux tag on Linux.

``python -m buildtools.wheelhouse DIR`` builds the variants this machine can
build and adds them; ``python -m buildtools.wheelhouse DIR --add WHEEL...``
adds wheels built elsewhere (an aarch64 or CUDA machine) to the same tree.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import shutil
import sys
import tempfile
from pathlib import Path

from buildtools.errors import BuildError, LlamactlError
from buildtools.variant import DIST_NAME, WHEEL_PREFIX, index_name

__all__ = ["add_wheel", "build_variants", "main", "normalize", "wheel_label", "write_indexes"]

_WHEEL = re.compile(rf"^{WHEEL_PREFIX}-(?P<version>[^-]+)-(?P<tags>.+)\.whl$")


def normalize(name: str) -> str:
    """PEP 503's normalized project name: ``Llamactl_Server`` → ``llamactl-server``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_label(filename: str) -> str | None:
    """The local version label of a llamactl-server wheel file name, if it has one."""
    m = _WHEEL.match(filename)
    if m is None:
        return None
    _, _, label = m.group("version").partition("+")
    return label or None


def add_wheel(wheel: Path, root: Path) -> Path:
    """Copy ``wheel`` into its variant's sub-index under ``root`` and rewrite the indexes.

    Refuses a wheel that is not for sharing (see the module docstring) with the
    reason, and leaves the tree as it was.
    """
    label = wheel_label(wheel.name)
    if label is None:
        raise BuildError(
            f"{wheel.name} is not a labelled {DIST_NAME} wheel",
            hint="make it with `llamactl build --wheel --portable --repair`",
        )
    variant = index_name(label)
    if variant is None:
        raise BuildError(
            f"{wheel.name} (+{label}) was built for the CPU of the machine that built it",
            hint="a wheelhouse serves other machines: build it with --portable",
        )
    if "-linux_" in wheel.name:
        raise BuildError(
            f"{wheel.name} has a plain linux tag, which pip only installs where it was built",
            hint="repair it first: `llamactl build --wheel --portable --repair`",
        )
    project = root / variant / normalize(DIST_NAME)
    project.mkdir(parents=True, exist_ok=True)
    target = project / wheel.name
    if wheel.resolve() != target.resolve():
        shutil.copy2(wheel, target)
    write_indexes(root)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _page(title: str, links: list[tuple[str, str]]) -> str:
    body = "\n".join(f'    <a href="{html.escape(href)}">{html.escape(text)}</a><br/>'
                     for href, text in links)  # fmt: skip
    return (
        "<!DOCTYPE html>\n<html>\n  <head>"
        '<meta name="pypi:repository-version" content="1.0">'
        f"<title>{html.escape(title)}</title></head>\n  <body>\n"
        f"{body}\n  </body>\n</html>\n"
    )


def write_indexes(root: Path) -> list[Path]:
    """(Re)write every ``index.html`` from the wheels present; returns the pages written."""
    written = []
    variants = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for variant in variants:
        projects = sorted(p for p in variant.iterdir() if p.is_dir())
        for project in projects:
            wheels = sorted(project.glob("*.whl"))
            links = [(f"{w.name}#sha256={_sha256(w)}", w.name) for w in wheels]
            page = project / "index.html"
            page.write_text(_page(f"Links for {project.name}", links))
            written.append(page)
        page = variant / "index.html"
        page.write_text(_page("Simple index", [(f"{p.name}/", p.name) for p in projects]))
        written.append(page)
    page = root / "index.html"
    root.mkdir(parents=True, exist_ok=True)
    page.write_text(_page(f"{DIST_NAME} variants", [(f"{v.name}/", v.name) for v in variants]))
    written.append(page)
    return written


def _say(message: str) -> None:
    print(f"llamactl: {message}", file=sys.stderr, flush=True)


def build_variants(root: Path) -> list[Path]:
    """Build, repair and add every variant this machine can build: the portable
    CPU build always, the CUDA one where CUDA is available."""
    from buildtools.hardware import Backend, detect  # speed
    from buildtools.wheel import build_wheel, repair  # speed

    profile = detect()
    backends = ["cpu"] + (["cuda"] if profile.backend_available(Backend.CUDA) else [])
    added = []
    with tempfile.TemporaryDirectory(prefix="llamactl-wheelhouse-") as tmp:
        dist = Path(tmp)
        for backend in backends:
            _say(f"wheelhouse: building the portable {backend} variant")
            wheel = build_wheel(dist, backend=backend, portable=True, on_line=_say)
            if profile.os == "linux":
                wheel = repair(wheel, dist)
            added.append(add_wheel(wheel, root))
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buildtools.wheelhouse")
    parser.add_argument("root", type=Path, help="the wheelhouse directory")
    parser.add_argument("--add", type=Path, nargs="+", metavar="WHEEL", help="add these wheels")
    args = parser.parse_args(argv)
    try:
        added = (
            [add_wheel(w, args.root) for w in args.add] if args.add else build_variants(args.root)
        )
    except LlamactlError as exc:
        from buildtools.wheel import failure_report  # speed

        for line in failure_report(exc):
            _say(line)
        return 1
    for path in added:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
