"""Read an experiment back through MLflow's own client (run by the server venv's python).

Usage: mlflow_read_back.py URI EXPERIMENT OUT_DIR. Prints one JSON document: every run of
the experiment (deleted ones too, flagged) with its info, tags, params, metric histories
and artifact paths; artifacts are downloaded under OUT_DIR/<run_id>/.
"""

import json
import sys
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            out += artifact_paths(client, run_id, entry.path)
        else:
            out.append(entry.path)
    return out


def main() -> None:
    uri, name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        print(json.dumps({"experiment": None, "runs": []}))
        return
    runs = []
    for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
        run_id = run.info.run_id
        histories = {
            key: [
                {"step": m.step, "value": m.value, "timestamp": m.timestamp}
                for m in client.get_metric_history(run_id, key)
            ]
            for key in run.data.metrics
        }
        paths = artifact_paths(client, run_id)
        if paths:
            client.download_artifacts(run_id, "", str(out / run_id))
        runs.append(
            {
                "run_id": run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "deleted": run.info.lifecycle_stage == "deleted",
                "tags": dict(run.data.tags),
                "params": dict(run.data.params),
                "metrics": histories,
                "artifacts": sorted(paths),
            }
        )
    print(json.dumps({"experiment": exp.experiment_id, "runs": runs}))


if __name__ == "__main__":
    main()
