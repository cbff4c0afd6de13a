"""The TOML configuration: the model and its parsing and checks, and comment-keeping edits.

Owns what a valid configuration is (``model``, ``load``, ``check`` and the ``check_*`` modules)
and how the admin commands edit it (``edit`` and the ``edit_*`` modules); the edits never
import the model they keep intact.
May import deidfs.deid (profiles, standard tables) and deidfs.errors only.
"""

from __future__ import annotations
