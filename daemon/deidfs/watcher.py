"""Watch one folder and report files once they have settled (contract; implementation TBD)."""

from __future__ import annotations
