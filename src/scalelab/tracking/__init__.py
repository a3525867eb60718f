"""Experiment trackers: MLflow (REST API) and TensorBoard, fed from what a run writes.

``metrics.jsonl`` and ``summary.json`` stay the source of truth; a tracker receives a
copy. :mod:`.config` is the ``tracking:`` section, :mod:`.mlflow` the REST client,
:mod:`.content` what a run directory contributes (redacted), :mod:`.sender` the bounded
background lane, :mod:`.live` the trainer's tracker and :mod:`.sync` the after-the-fact
upload that ``scalelab track sync`` runs.
"""
