"""``python -m deidfs``: the same entry point as the ``deidfs`` console script."""

from __future__ import annotations

from deidfs.cli.main import main

raise SystemExit(main())
