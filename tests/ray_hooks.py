"""Ray worker setup hook for tests/test_engine_ray.py (imported by every Ray worker of the test cluster).

When ``SFTDATA_TEST_CRASH_MARKER`` names a file that exists, the first ``RowPipeline.process`` call in any worker
removes it and kills its process (``os._exit``: no exception, no cleanup), as a crashed machine would; Ray then
restarts the actor and re-sends the batch."""

from __future__ import annotations

import os


def crash_once_on_marker() -> None:
    marker = os.environ.get("SFTDATA_TEST_CRASH_MARKER")
    if not marker:
        return
    from sftdata.pipeline import RowPipeline

    process = RowPipeline.process

    def process_or_die(self, records, origin=0):
        try:
            os.remove(marker)  # atomic: exactly one worker wins, once
        except FileNotFoundError:
            return process(self, records, origin)
        os._exit(1)

    RowPipeline.process = process_or_die
