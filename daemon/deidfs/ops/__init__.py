"""What operators see and drive: metrics, the HTTP endpoint, the control socket, logs.

Owns sd_notify, PHI-free logging and the parent-death lifeline of worker processes.
May import deidfs.errors only: every other package reports through it.
"""

from __future__ import annotations
