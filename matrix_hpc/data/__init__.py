"""Datasets out of an output directory: export and curation (docs/datasets_out.md).

One module per job:

- ``source``: which committed rows an export or a curation reads (the
  store's own file listing, a status selection, a run in progress);
- ``export``: ``export hf`` (a ``datasets.load_from_disk`` directory with a
  dataset card) and ``export jsonl``, both streaming;
- ``plan``: the resumable unit of curation work (one row group of one part
  file) and the Ray Data stage that runs the pending ones;
- ``text``: text normalisation and word n-grams (shared by both curations);
- ``dedup``: exact and MinHash/LSH near-duplicate removal;
- ``decontaminate``: n-gram overlap with benchmark files.

Nothing here writes into an output directory; ``ray``, ``datasets`` and
``datasketch`` are imported where they are used.
"""
