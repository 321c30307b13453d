"""Methods: heads over cached features, one module each, registered by name (``taskres methods`` lists them).

A new method is one new module in this package that ends with ``register_method(Method(...))``; see
``taskres.methods.base`` for what it defines and ``tests/test_method_contract.py`` for what every method must do.
"""

from __future__ import annotations

from taskres.methods.base import Artifact, CosineHead, FitContext, Fitted, Head, cosine_logits, option
from taskres.methods.registry import METHODS, Method, OfficialVariant, discover, get_method, register_method

__all__ = [
    "Artifact",
    "CosineHead",
    "FitContext",
    "Fitted",
    "Head",
    "METHODS",
    "Method",
    "cosine_logits",
    "OfficialVariant",
    "discover",
    "get_method",
    "option",
    "register_method",
]

discover()  # every method module registers itself on import
