"""pmoe: reference reproduction of PromptMoE (zero-shot anomaly detection with visually-guided
prompt mixtures).

    >>> import pmoe
    >>> config = pmoe.Config.preset("tiny")
    >>> model = pmoe.build_model(config)
    >>> out = model(images)  # images: (B, 3, config.image_size, config.image_size)
    >>> out["anomaly_map"], out["score"], out["routing"]

Heavy modules (torch, open_clip) load on first use of ``build_model`` or ``PromptMoE``.
"""

from pmoe.config import Config
from pmoe.errors import PmoeError

__version__ = "0.1.0"
__all__ = ["Config", "PmoeError", "PromptMoE", "build_model", "__version__"]


def __getattr__(name):
    """``build_model``/``PromptMoE`` and the submodules (``pmoe.inference``...) load on first use."""
    import importlib

    if name in ("build_model", "PromptMoE"):
        return getattr(importlib.import_module("pmoe.model"), name)
    try:
        return importlib.import_module(f"pmoe.{name}")
    except ModuleNotFoundError as error:
        raise AttributeError(f"module 'pmoe' has no attribute {name!r}") from error
