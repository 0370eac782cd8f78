"""The experiment pipeline of the i-ResNet reproduction: one module per DVC stage, a typer CLI, MLflow tracking.

Data flows one way: ``params.yaml -> stage module -> iresnet -> artifacts (data/, models/, reports/) + MLflow``.
Every stage module exposes ``run(params, paths, tracker=None) -> dict`` of metrics; ``pipeline.cli`` wraps it.
"""
