"""The wheelhouse is a PEP 503 simple index per variant; only shareable wheels go in."""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from buildtools.errors import BuildError
from buildtools.wheelhouse import add_wheel, normalize, wheel_label

CPU = "llamactl_server-0.1.0+cpu.portable-py3-none-manylinux_2_36_x86_64.whl"
CPU_ARM = "llamactl_server-0.1.0+cpu.portable-py3-none-manylinux_2_35_aarch64.whl"
CUDA = "llamactl_server-0.1.0+cu130.portable-py3-none-manylinux_2_36_x86_64.whl"


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def links(page: Path) -> list[str]:
    parser = Links()
    parser.feed(page.read_text())
    return parser.hrefs


def wheel(tmp: Path, name: str) -> Path:
    path = tmp / "dist" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(name.encode())  # content only matters to the hash
    return path


def test_layout_is_one_simple_index_per_variant(tmp_path: Path) -> None:
    root = tmp_path / "wheelhouse"
    for name in (CPU, CPU_ARM, CUDA):
        add_wheel(wheel(tmp_path, name), root)
    assert links(root / "index.html") == ["cpu/", "cu130/"]
    assert links(root / "cpu" / "index.html") == ["llamactl-server/"]
    project = root / "cpu" / "llamactl-server"
    hrefs = links(project / "index.html")
    assert [h.split("#")[0] for h in hrefs] == sorted([CPU, CPU_ARM])
    for href in hrefs:
        name, _, fragment = href.partition("#")
        assert fragment == f"sha256={hashlib.sha256((project / name).read_bytes()).hexdigest()}"
    assert [h.split("#")[0] for h in links(root / "cu130" / "llamactl-server" / "index.html")] == [
        CUDA
    ]


def test_adding_again_keeps_one_copy(tmp_path: Path) -> None:
    root = tmp_path / "wheelhouse"
    add_wheel(wheel(tmp_path, CPU), root)
    target = add_wheel(wheel(tmp_path, CPU), root)
    assert len(links(target.parent / "index.html")) == 1


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("llamactl_server-0.1.0+cpu-py3-none-manylinux_2_36_x86_64.whl", "--portable"),
        ("llamactl_server-0.1.0+cpu.portable-py3-none-linux_x86_64.whl", "--repair"),
        ("llamactl_server-0.1.0-py3-none-manylinux_2_36_x86_64.whl", "--portable --repair"),
        ("other-1.0-py3-none-any.whl", "--portable --repair"),
    ],
)
def test_wheels_not_for_sharing_are_refused(tmp_path: Path, name: str, why: str) -> None:
    root = tmp_path / "wheelhouse"
    with pytest.raises(BuildError) as info:
        add_wheel(wheel(tmp_path, name), root)
    assert why in (info.value.hint or "")
    assert not root.exists()


def test_names() -> None:
    assert normalize("Llamactl_Server") == "llamactl-server"
    assert wheel_label(CUDA) == "cu130.portable"
    assert wheel_label("llamactl_server-0.1.0-py3-none-any.whl") is None
