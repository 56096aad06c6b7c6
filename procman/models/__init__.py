"""Models: what the user names, the GGUF file it resolves to, and what its header says.

:mod:`~procman.models.refs` turns ``demo``, a path, ``hf:``/``ollama:``/``lmstudio:``
references or a cached name into a file; :mod:`~procman.models.pull` downloads
``hf:`` models into the Hugging Face cache; :mod:`~procman.models.discover`
finds the models other tools keep; :mod:`~procman.models.gguf` validates a file
and reads its shape into a :class:`~procman.models.info.ModelInfo`, remembered
by file identity in ``_info_cache`` so that a file seen before is not parsed again.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.models.discover import Found, Stores, default_stores, find_models
    from procman.models.gguf import validate_model
    from procman.models.info import ModelInfo
    from procman.models.pull import Pulled, PullError, PullProgress, pull
    from procman.models.refs import DEMO_MODEL, default_name, resolve_model

__all__ = [
    "DEMO_MODEL",
    "Found",
    "ModelInfo",
    "PullError",
    "PullProgress",
    "Pulled",
    "Stores",
    "default_name",
    "default_stores",
    "find_models",
    "pull",
    "resolve_model",
    "validate_model",
]

__getattr__, __dir__ = exports(
    __name__,
    {
        "ModelInfo": "procman.models.info",
        "validate_model": "procman.models.gguf",
        **dict.fromkeys(("DEMO_MODEL", "default_name", "resolve_model"), "procman.models.refs"),
        **dict.fromkeys(("PullError", "PullProgress", "Pulled", "pull"), "procman.models.pull"),
        **dict.fromkeys(
            ("Found", "Stores", "default_stores", "find_models"), "procman.models.discover"
        ),
    },
)
