"""The experiment pipeline of the i-ResNet reproduction: one module per DVC stage, a typer CLI, MLflow tracking.

Data flows one way: ``params.yaml -> stage module -> iresnet -> artifacts (data/, models/, reports/) + MLflow``.
Every stage module exposes ``run(params, paths, tracker=None) -> dict`` of metrics; ``pipeline.cli`` wraps it.
"""

import os as _os

# MLflow 3 reports usage to its makers over the network and keeps an installation id in the home directory unless
# told not to; an offline, reproducible pipeline does neither. Set MLFLOW_DISABLE_TELEMETRY=false to allow it.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
