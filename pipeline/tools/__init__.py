"""Tools around the pipeline, not part of any stage: the benchmark (``python -m pipeline.tools.bench``), ``--dry-run``
measurements, the GPU check and budget runs, and the paper-scale profiles' ``dvc.yaml`` generator."""
