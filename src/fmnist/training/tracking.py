"""Experiment tracking: a run's settings, progress and results, for TensorBoard and MLflow.

    fmnist train --track tensorboard          # event files in RUN_DIR/tensorboard/
    tensorboard --logdir runs                 # every tracked run, side by side
    fmnist train --track mlflow               # to $MLFLOW_TRACKING_URI (default: a store in ./mlruns)
    fmnist train --track tensorboard --track mlflow

Both follow the run as listeners (fmnist.training.events): per epoch the losses,
accuracies, learning rate and images/s; at the end the hyperparameters with the test
metrics. MLflow also gets the resolved recipe as parameters, the data release and its
SHA-256 as tags, and the report, figures, weights, config and history as artifacts (the
ONNX file too, when the run is exported). A resumed run continues the same tracked run:
TensorBoard hides the replayed epochs (purge_step), MLflow's run is found by the run
folder's tag. A tracker that cannot start stops the run before any training (one line,
exit 2); one that fails later is reported once and dropped, and the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from pathlib import Path

from ..core import runs
from ..core.errors import UserError
from .events import Listener

TRACKERS = ("tensorboard", "mlflow")
TRACKING = "tracking.json"  # in the run folder: which MLflow run follows it
EXPERIMENT = "fmnist"


def trackers(names) -> list[Listener]:
    """The trackers named (each at most once), as listeners."""
    names = list(dict.fromkeys(names or ()))
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise UserError(f"unknown tracker '{unknown[0]}' (choose {', '.join(TRACKERS)})")
    return [{"tensorboard": TensorBoard, "mlflow": MLflow}[name]() for name in names]


def hyperparameters(run) -> dict:
    """The resolved settings as flat scalars (what trackers can compare runs on)."""
    settings = dataclasses.asdict(run.config)
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in settings.items() if value is not None}


def final_metrics(metrics: dict) -> dict[str, float]:
    calibration = metrics.get("calibration") or {}
    found = {"test_accuracy": metrics.get("accuracy"), "test_loss": metrics.get("loss"),
             "test_top2_accuracy": metrics.get("top2_accuracy"), "best_epoch": metrics.get("best_epoch"),
             "best_val_accuracy": metrics.get("best_val_accuracy"), "test_ece": calibration.get("test_ece_before"),
             "test_ece_calibrated": calibration.get("test_ece_after"), "temperature": calibration.get("temperature")}
    return {name: float(value) for name, value in found.items() if value is not None}


EPOCH_SCALARS = {"loss/train": "train_loss", "loss/validation": "val_loss", "accuracy/train": "train_accuracy",
                 "accuracy/validation": "val_accuracy", "learning_rate": "lr", "images_per_second": "images_per_second"}


class Tracker(Listener):
    """A listener whose failures after the start cost the tracking, never the run."""

    name = "tracker"
    broken = False

    def _guarded(self, action, *args) -> None:
        if self.broken:
            return
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 - a tracking server going away must not stop training
            self.broken = True
            warnings.warn(f"tracking to {self.name} stopped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
                          f"the run goes on", stacklevel=2)

    def on_epoch_end(self, run, row: dict, best: bool) -> None:
        self._guarded(self.epoch, run, row)

    def on_run_end(self, run, metrics: dict, test_logits) -> None:
        self._guarded(self.end, run, metrics)

    def epoch(self, run, row: dict) -> None: ...

    def end(self, run, metrics: dict) -> None: ...


class TensorBoard(Tracker):
    """Event files in RUN_DIR/tensorboard, one scalar per epoch and an hparams summary."""

    name = "TensorBoard"

    def on_run_start(self, run) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--track tensorboard needs TensorBoard", hint="pip install 'fmnist[track]'") from None
        # purge_step: epochs a resumed run trains again replace the ones logged before the stop
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"), purge_step=run.start_epoch)

    def epoch(self, run, row: dict) -> None:
        for tag, key in EPOCH_SCALARS.items():
            self.writer.add_scalar(tag, row[key], global_step=row["epoch"])
        self.writer.flush()

    def end(self, run, metrics: dict) -> None:
        self.writer.add_hparams(hyperparameters(run), {f"hparam/{k}": v for k, v in final_metrics(metrics).items()},
                                run_name=".")  # beside the scalars, not in a folder of its own
        self.writer.close()


class MLflow(Tracker):
    """One MLflow run per fmnist run, through MLflow's client (the caller's active run, if
    any, is left alone)."""

    name = "MLflow"

    def on_run_start(self, run) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("--track mlflow needs MLflow", hint="pip install 'fmnist[track]'") from None
        uri = tracking_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self._find_or_start(run)
            self._record_start(run)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow and its HTTP client raise many kinds
            raise UserError(f"cannot track to MLflow at {uri}: {str(exc).splitlines()[0][:200]}",
                            hint="start the server, or set MLFLOW_TRACKING_URI") from None

    def _find_or_start(self, run) -> str:
        recorded = run.run_dir / TRACKING
        if recorded.exists():  # a resumed run: the same MLflow run
            return runs.read_json(recorded)["mlflow_run_id"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            local = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path.cwd() / LOCAL_STORE / "artifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=local)
        else:
            experiment_id = experiment.experiment_id
        source = run.data.source
        tags = {"mlflow.runName": run.run_dir.name, "fmnist.run_dir": str(run.run_dir.resolve()),
                "fmnist.model": run.config.model, "data.release": source.release,
                "data.sha256": source.content_sha256}
        run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
        runs.write_json(recorded, {"mlflow_tracking_uri": tracking_uri(), "mlflow_run_id": run_id})
        return run_id

    def _record_start(self, run) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in hyperparameters(run).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def epoch(self, run, row: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(tag.replace("/", "_"), float(row[key]), now, row["epoch"]) for tag, key in EPOCH_SCALARS.items()])

    def end(self, run, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in final_metrics(metrics).items()])
        for name in (runs.REPORT, runs.WEIGHTS, runs.CONFIG, runs.HISTORY):
            self.client.log_artifact(self.run_id, str(run.run_dir / name))
        self.client.log_artifacts(self.run_id, str(run.run_dir / runs.FIGURES), artifact_path=runs.FIGURES)
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints where to see the run: not a result
            self.client.set_terminated(self.run_id)


LOCAL_STORE = "mlruns"  # with no $MLFLOW_TRACKING_URI: ./mlruns/mlflow.db and ./mlruns/artifacts


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a local store: a SQLite database in ./mlruns (MLflow's plain
    folder store is frozen and refused by current MLflow), viewed with
    ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    store = (Path.cwd() / LOCAL_STORE).resolve()
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def log_export(run_dir: Path, exported: Path) -> bool:
    """Add an exported model to the MLflow run that tracked ``run_dir``, if one did. Returns
    whether it did; a failure is a warning (the export itself is done)."""
    recorded = Path(run_dir) / TRACKING
    if not recorded.exists():
        return False
    try:
        from mlflow.tracking import MlflowClient

        record = runs.read_json(recorded)
        MlflowClient(tracking_uri=record["mlflow_tracking_uri"]).log_artifact(record["mlflow_run_id"], str(exported))
    except Exception as exc:  # noqa: BLE001 - MLflow missing, server gone: the file is written anyway
        warnings.warn(f"the export was not added to the run's MLflow run: {str(exc).splitlines()[0][:200]}",
                      stacklevel=2)
        return False
    return True
