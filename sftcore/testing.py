"""pytest plugin for sftcore plugin authors (entry point ``pytest11: sftcore``).

Importing this module imports neither torch nor transformers: pytest loads it in every
session of an environment where sftcore is installed.
"""

from __future__ import annotations
