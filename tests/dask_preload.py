"""A Dask worker preload for ``tests/test_cluster.py``: faults at chosen moments of a batch.

``$DEIDFS_TEST_FAULTS`` names a directory; a file there is a request, which the first
worker to reach its moment claims (renaming it to ``<name>.taken``: one worker acts on
each request, once) and carries out:

- ``kill-worker-mid-batch``: at the second file of a batch, the worker kills itself with
  SIGKILL (the first file may or may not be in place yet);
- ``kill-worker-after-batch``: once a batch's files are all in place, before its results
  are returned, the worker kills itself with SIGKILL (when the file holds ``pending``: only
  after a batch that left a view pending, in a temporary file, for the client to settle);
- ``kill-worker-on-fetch``: when a batch's results are asked of the worker that holds them
  (done, not yet fetched), the worker kills itself with SIGKILL: they are lost with it;
- ``kill-scheduler``: at the second file of a batch, the worker kills with SIGKILL the
  process whose pid the file holds (the scheduler).

Only writers in workers (``replace=False``) are watched: the client's own writer never is.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from deidfs.export import outcomes
from deidfs.export import writer as export

FAULTS_ENV = "DEIDFS_TEST_FAULTS"


def _claim(name: str) -> str | None:
    """The request's content once this process has claimed it, else None."""
    faults = os.environ.get(FAULTS_ENV)
    if not faults:
        return None
    request = Path(faults) / name
    taken = request.with_name(f"{name}.taken")
    try:
        os.rename(request, taken)
    except OSError:
        return None  # no such request, or another worker took it
    return taken.read_text().strip()


def dask_setup(worker: Any) -> None:
    put_path = export.ExportWriter.put_path
    finish = export.ExportWriter.finish

    def put_path_with_faults(self: export.ExportWriter, *args: Any, **kwargs: Any) -> Any:
        if not self.replace:
            puts = self.__dict__.get("_test_puts", 0) + 1
            self.__dict__["_test_puts"] = puts
            if puts == 2:
                if _claim("kill-worker-mid-batch") is not None:
                    os.kill(os.getpid(), signal.SIGKILL)
                pid = _claim("kill-scheduler")
                if pid is not None:
                    os.kill(int(pid), signal.SIGKILL)
        return put_path(self, *args, **kwargs)

    def finish_with_faults(self: export.ExportWriter) -> list[outcomes.Result]:
        results = finish(self)
        if self.replace or not results:
            return results
        faults = Path(os.environ.get(FAULTS_ENV, "/nonexistent"))
        try:
            wanted = (faults / "kill-worker-after-batch").read_text().strip()
        except OSError:
            return results
        pending = any(r.outcome is outcomes.Outcome.PENDING for r in results)
        if (wanted != "pending" or pending) and _claim("kill-worker-after-batch") is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return results

    get_data = worker.handlers["get_data"]

    async def get_data_with_faults(comm: Any, **kwargs: Any) -> Any:
        # The server passes ``comm`` to a handler that names it (as the original does).
        keys = kwargs.get("keys") or ()
        asked = any(str(k).startswith("deidfs-batch-") for k in keys)
        if asked and _claim("kill-worker-on-fetch") is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return await get_data(comm, **kwargs)

    worker.handlers["get_data"] = get_data_with_faults
    export.ExportWriter.put_path = put_path_with_faults  # type: ignore[method-assign]
    export.ExportWriter.finish = finish_with_faults  # type: ignore[method-assign]
