"""MLflow (the `mlflow` logger): one MLflow run per run folder, one experiment per sweep.

The store is `logger.mlflow.tracking_uri`: by default a SQLite file, outputs/mlflow.db under
the working directory (artifacts beside it in outputs/mlartifacts/), no server needed; or any
tracking URI, a server's included. The run gets the flattened config as params, the tracker's
metrics with their steps, the run folder's tables and figures as artifacts, and its status.

The run id is kept in the run folder (mlflow.json): `resume=true` continues the same run, and
steps it had logged already (past the checkpoint, before the interruption) are not logged
twice. Parallel jobs writing one SQLite file take turns through a lock file beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifar_run.outputs import atomic, locks
from cifar_run.outputs.loggers.base import STEP_LOSS, STEP_LR, Start

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"
DEFAULT_DB = Path("outputs") / "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store
ARTIFACT_SUFFIXES = (".csv", ".md", ".json", ".png", ".yaml")
SEND_SECONDS = 10.0  # metrics are sent at least this often, and after every epoch
METRICS_PER_CALL = 1000  # MLflow's limits per log_batch call
PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 500  # the shortest limit of the MLflow versions in use
# A tracking server that is down should cost seconds, not MLflow's default of minutes of
# retries; a user's own settings of these win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def default_tracking_uri() -> str:
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative, or absolute with four slashes)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def sweep_dir() -> str | None:
    """The sweep folder of a Hydra multirun job; None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return str(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None


def experiment_name(configured: str | None) -> str:
    """The configured name; else one experiment per sweep (named after its folder), and
    `cifar-run` for single runs."""
    return configured or sweep_dir() or "cifar-run"


def param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class MLflowLogger:
    name = "mlflow"

    def __init__(self, start: Start) -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        settings = start.settings
        self.uri = str(settings.get("tracking_uri") or default_tracking_uri())
        self.db = sqlite_file(self.uri)
        self.out_dir = start.out_dir
        self.every = int(settings.get("every_n_steps", 1))
        self.pending: list[Any] = []
        self.sent = time.monotonic()
        self.logged: dict[str, int] = {}  # last step of each metric the store has already
        with self._turn():
            # Creating the client opens the store: a new SQLite file gets its tables then.
            self.client = MlflowClient(tracking_uri=self.uri)
            run_id = self._reopen(start) if start.resumed else None
            if run_id is None:
                run_id = self._create(start, settings.get("experiment"), settings.get("run_name"))
        self.run_id = run_id
        record = {"run_id": run_id, "tracking_uri": self.uri}
        atomic.write_text(self.out_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")
        log.info("mlflow: run %s in %s", run_id, self.uri)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Parallel jobs take turns at a SQLite file (its first use creates the tables)."""
        if self.db is None:
            yield
            return
        self.db.parent.mkdir(parents=True, exist_ok=True)
        with locks.exclusive(self.db.with_name(self.db.name + ".lock")):
            yield

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.db is not None:  # a local store keeps its artifacts beside it
            location = (self.db.parent / ARTIFACTS_DIR).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _create(self, start: Start, experiment: str | None, run_name: str | None) -> str:
        experiment_id = self._experiment(experiment_name(experiment))
        run = self.client.create_run(
            experiment_id,
            run_name=run_name or self.out_dir.name,
            tags={"cifar_run.run_folder": str(self.out_dir.resolve())},
        )
        self._params(run.info.run_id, start.params, logged=set())
        return run.info.run_id

    def _reopen(self, start: Start) -> str | None:
        """The run this folder logged to before, marked running again; None if there is none
        in this store."""
        from mlflow.exceptions import MlflowException

        try:
            record = json.loads((self.out_dir / RUN_FILE).read_text())
            if record.get("tracking_uri") != self.uri:  # another store: a new run there
                return None
            run = self.client.get_run(str(record["run_id"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, MlflowException):
            return None
        run_id = run.info.run_id
        self.client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            self.logged[key] = max((m.step for m in history), default=-1)
        self._params(run_id, start.params, logged=set(run.data.params))
        log.info("mlflow: continuing run %s", run_id)
        return run_id

    def _params(self, run_id: str, params: dict[str, Any], logged: set[str]) -> None:
        from mlflow.entities import Param

        # A resumed run keeps the values it started with (MLflow refuses changed ones).
        new = [Param(k, param_text(v)) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=new[i : i + PARAMS_PER_CALL])

    def _add(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        if step > self.logged.get(key, -1):  # a resumed run: not the steps logged before
            self.pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def _send(self) -> None:
        metrics, self.pending = self.pending, []
        self.sent = time.monotonic()
        with self._turn():
            for i in range(0, len(metrics), METRICS_PER_CALL):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + METRICS_PER_CALL])

    def steps(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["step"] % self.every == 0:
                self._add(STEP_LOSS, row["train_loss"], row["step"])
                self._add(STEP_LR, row["lr"], row["step"])
        if time.monotonic() - self.sent >= SEND_SECONDS:
            self._send()

    def epoch(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._add(key, value, step)
        self._send()

    def finish(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._add(key, value, step)
        self._send()
        self._artifacts()

    def _artifacts(self) -> None:
        files = [
            p
            for p in sorted(self.out_dir.iterdir())
            if p.is_file() and p.suffix in ARTIFACT_SUFFIXES and not p.name.startswith(".")
        ]
        with self._turn():
            for path in files:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self._send()
        if status != "FINISHED":  # what the folder says about the failure (finish() did the rest)
            self._artifacts()
        with self._turn():
            self.client.set_terminated(self.run_id, status=status)
