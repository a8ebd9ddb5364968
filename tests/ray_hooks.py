"""Ray worker setup hook for tests/test_engine_ray.py (run by every Ray worker of the test's local cluster).

* The workers must get the tokenizer and the decontamination index from the object store, never build them again
  from files (which a worker on another machine may not have): loading a tokenizer or building a ``Decontaminator``
  in a worker raises.
* When ``SFTDATA_TEST_CRASH_MARKER`` names a file that exists, the first ``RowPipeline.process`` call of any worker
  on a batch that is not the first of its file (so the file's read task has sent parts on already) removes it and
  kills its process (``os._exit``: no exception, no cleanup), as a crashed machine would; Ray then
  restarts the actor and re-sends the batch.
* When ``SFTDATA_TEST_WRITER_LOG`` is set, every Parquet file a worker opens for writing is logged there as
  ``PID PATH``, so a test can tell which output shards Ray tasks wrote.
"""

from __future__ import annotations

import os


def install() -> None:
    import sftdata.tokenizer
    from sftdata.clean.decontaminate import Decontaminator
    from sftdata.pipeline import RowPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker built what the driver ships through the object store")

    sftdata.tokenizer.load_tokenizer = refuse
    Decontaminator.__init__ = refuse

    log = os.environ.get("SFTDATA_TEST_WRITER_LOG")
    if log:
        import pyarrow.parquet as pq

        open_writer = pq.ParquetWriter.__init__

        def logged(self, where, *args, **kwargs):
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {where}\n")
            open_writer(self, where, *args, **kwargs)

        pq.ParquetWriter.__init__ = logged

    marker = os.environ.get("SFTDATA_TEST_CRASH_MARKER")
    if not marker:
        return
    process = RowPipeline.process

    def process_or_die(self, records, origin=0):
        if not records or records[0].row <= 2:  # not a file's first batch: earlier parts of it were already sent on
            return process(self, records, origin)
        try:
            os.remove(marker)  # atomic: exactly one worker wins, once
        except FileNotFoundError:
            return process(self, records, origin)
        os._exit(1)

    RowPipeline.process = process_or_die
