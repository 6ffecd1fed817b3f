"""Rewrite every model in a folder tree (a "model zoo") in parallel worker processes, and summarise the results.

Finding the models (``discover``)
    Every ``*.prototxt`` / ``*.prototxt.txt`` under the zoo is a candidate (hidden folders and the output folder are
    not searched). Its text is sniffed, never parsed in this process:

    * a **solver** (file name with "solver", or solver fields such as ``base_lr``/``max_iter``) is recorded and
      skipped: it describes training, not a net;
    * a **training net** (``phase: TRAIN`` rules, data layers such as Data/ImageData/HDF5Data, or a loss) is
      recorded and skipped when its folder has a deploy net: the deploy net is what runs on the phone, and the
      train_val file would only repeat it with data and loss layers around it. A training net with *no* deploy net
      beside it is rewritten in phase TEST (Caffe's own filter), so a folder that ships only a train_val still gets
      its inference net rewritten;
    * anything else is a **deploy net**.

    Weights pair with a net by stem (``deploy.prototxt`` + ``deploy.caffemodel``), else a folder's only unpaired
    deploy net (among several: the only one named ``deploy*``) takes the folder's only unpaired ``*.caffemodel``
    (the model-zoo layout: ``deploy.prototxt`` next to ``bvlc_alexnet.caffemodel``). A caffemodel that pairs with
    nothing is recorded as skipped, with the reason.

Running them (``run_batch``)
    One spawned process per model, ``jobs`` at a time, each in its own process group with a per-model timeout.
    Caffe aborts the whole process on a fatal check, numpy can be killed by the OOM killer: a dead or overdue
    worker is recorded (with the last line it wrote to stderr, which for Caffe is the failed check) and the batch
    goes on. A ``concurrent.futures`` pool cannot do that: one dead worker breaks the whole pool, and a running task
    cannot be cancelled; so the workers are plain ``multiprocessing`` processes of the spawn context.

Outputs
    ``OUT_DIR/<relative folder>/`` gets the rewritten prototxt and caffemodel under their original names, the rewrite
    report ``<stem>.report.json`` and ``<stem>.batch.json`` (this model's summary row and a fingerprint of its
    inputs and options). A worker writes into a hidden staging folder; only a finished rewrite is moved into place,
    so a crash, a timeout or Ctrl-C leaves either a model's complete outputs or none. ``summary.json``,
    ``summary.csv`` and ``summary.md`` in OUT_DIR list every model found (also after Ctrl-C, for what finished).

Second runs
    A model whose ``<stem>.batch.json`` says it succeeded with the same inputs (their sha256) and the same options
    is not redone (``force`` redoes it). Failed models are always retried: a timeout or an out-of-memory kill may
    not happen again, and a fixed file should be picked up.

Where each part lives: ``records`` (options, found models, summary rows), ``discover``, ``job`` (one model, in a
worker), ``pool`` (the workers, timeouts, Ctrl-C), ``markers`` (second runs, staging folders), ``summary`` (the
summary files).
"""

from __future__ import annotations

from deeprebirth.batch.discover import CAFFEMODEL_SUFFIX, PROTOTXT_SUFFIXES, discover, sniff_kind
from deeprebirth.batch.job import ModelTask, rewrite_model, rewrite_options
from deeprebirth.batch.markers import STAGING_PREFIX
from deeprebirth.batch.pool import run_batch
from deeprebirth.batch.records import FAILED, BatchOptions, BatchSummary, FoundModel, ModelResult
from deeprebirth.batch.summary import CSV_COLUMNS, summary_csv, summary_markdown, write_summary

__all__ = ["CAFFEMODEL_SUFFIX", "CSV_COLUMNS", "FAILED", "PROTOTXT_SUFFIXES", "STAGING_PREFIX", "BatchOptions",
           "BatchSummary", "FoundModel", "ModelResult", "ModelTask", "discover", "rewrite_model", "rewrite_options",
           "run_batch", "sniff_kind", "summary_csv", "summary_markdown", "write_summary"]
