"""The ``deidfs`` command line: the only layer that prints.

Owns parsing the commands, their exit codes and what they show on a terminal.
May import every package; nothing imports it but ``deidfs.__main__``.
"""

from __future__ import annotations
