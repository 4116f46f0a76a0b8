"""sftcore: supervised fine-tuning of causal LMs, every stage a plugin.

Importing this package is cheap: it pulls in neither torch nor transformers.
"""

from __future__ import annotations

import pluggy

__version__ = "0.2.0"

PROJECT = "sft"
IGNORE_INDEX = -100
"""Label value that the loss ignores (``torch.nn.CrossEntropyLoss`` default)."""

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Decorator marking a plugin's hook implementation: ``@hookimpl``."""

from sftcore.errors import RowDropped, SftError  # noqa: E402

__all__ = ["IGNORE_INDEX", "PROJECT", "RowDropped", "SftError", "__version__", "hookimpl"]
