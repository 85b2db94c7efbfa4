"""Hyperparameter sweeps with Optuna: a study in a database, trials that are run folders.

    fmnist sweep --model resnet --trials 20 --workers 2            # SQLite in the sweep folder
    fmnist sweep --model resnet --trials 20 --storage postgresql://user@db/fmnist   # shared
    fmnist sweep --show runs/sweep-resnet-20261201-120000          # leaderboard and plot

Each trial trains a normal run folder (``SWEEP/trial-0007/``) with the model's recipe and
the values the sampler suggests (TPE), reporting validation accuracy after every epoch so
that the median pruner can stop hopeless trials early. Selection uses the validation split
only; when the sweep ends, the winner alone is evaluated on the test set. Several worker
processes, here or on other machines (same ``--storage``), share one study; each takes its
share of this machine's cores. A worker that dies has its trial marked failed and is
replaced; the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
from pathlib import Path

from ..core import runs
from ..core.errors import UserError
from ..models.recipe import RECIPE_FIELDS, search_space
from ..models.registry import canonical_name, model_entry
from .events import Listener

PLOT = "search.png"


def suggest(trial, space: dict[str, tuple]) -> dict:
    methods = {"log": lambda n, lo, hi: trial.suggest_float(n, lo, hi, log=True),
               "float": trial.suggest_float, "int": trial.suggest_int}
    return {name: methods[kind](name, low, high) for name, (kind, low, high) in space.items()}


# ----------------------------------------------------------------------------- the study


def _storage(url: str):
    import optuna

    # SQLite serialises writers; a generous timeout makes workers wait for the lock instead of failing.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for plain in ("postgresql://", "postgres://"):  # the driver fmnist installs, whatever SQLAlchemy's default
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain):]
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and driver errors of every kind
        raise UserError(f"cannot open the study storage {url}: {str(exc).splitlines()[0][:200]}") from None


def _study(spec: dict):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=spec["study"], storage=_storage(spec["storage"]), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=spec["seed"] + os.getpid() % 1000),  # workers explore differently
        # Stop a trial whose validation accuracy is below the median of earlier trials at the
        # same epoch, once two trials have finished and after its own first epoch.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))


class _Pruner(Listener):
    """Reports each epoch's validation accuracy to the trial, and stops a hopeless one (the
    epoch is checkpointed already: the trial's folder stays a valid run)."""

    def __init__(self, trial):
        self.trial = trial

    def on_epoch_end(self, run, row: dict, best: bool) -> None:
        import optuna

        self.trial.report(row["val_accuracy"], row["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}")


def _objective(spec: dict, data):
    from .config import TrainConfig
    from .run import train

    space = {name: tuple(bounds) for name, bounds in spec["space"].items()}

    def objective(trial) -> float:
        trial.set_user_attr("pid", os.getpid())
        values = suggest(trial, space)
        run_dir = Path(spec["out"]) / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        config = TrainConfig(**{**spec["fixed"], **values, "model": spec["model"]})
        result = train(config, out=run_dir, data=data, progress=False, log=lambda line: None,
                       listeners=[_Pruner(trial)], track=spec.get("track", ()), test=False)
        return result.metrics["best_val_accuracy"]

    return objective


def _worker(spec: dict, processes: int) -> None:
    """One worker process: trials until the study has ``trials`` finished ones."""
    import optuna

    from ..data.dataset import load_dataset
    from ..core.runtime import share_cores

    share_cores(processes)
    data = load_dataset(spec["data_dir"])
    study = _study(spec)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    study.optimize(_objective(spec, data), catch=(UserError,),
                   callbacks=[optuna.study.MaxTrialsCallback(spec["trials"], states=done)])


def _finished(study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(t.state in states for t in study.get_trials(deepcopy=False))


def _fail_trials_of(study, pid: int) -> list[int]:
    """Mark the running trials of a dead worker failed (Optuna would leave them 'running')."""
    import optuna

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("pid") == pid:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            failed.append(trial.number)
    return failed


def run_sweep(model: str, trials: int, workers: int = 1, storage: str | None = None, out=None,
              fixed: dict | None = None, data_dir=None, seed: int = 0, log=print, track=()) -> Path:
    """Run (or join) a study until it has ``trials`` finished trials; returns the sweep folder.
    ``track`` names experiment trackers: one tracked run per trial."""
    if trials < 1 or workers < 1:
        raise UserError("--trials and --workers must be at least 1")
    model = canonical_name(model)
    fixed = dict(fixed or {})
    if fixed.get("val_fraction", 0.1) == 0:
        raise UserError("a sweep selects on the validation split: --val-fraction must be above 0")
    out = Path(out) if out is not None else Path("runs") / f"sweep-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": model, "trials": trials, "fixed": fixed, "seed": seed, "out": str(out.absolute()),
            "study": f"fmnist-{model}-{out.name}", "data_dir": None if data_dir is None else str(data_dir),
            "storage": storage or f"sqlite:///{(out / 'study.db').absolute()}", "track": list(track),
            "space": search_space(dataclasses.replace(model_entry(model).recipe, **_recipe_part(fixed)), set(fixed))}
    if (out / runs.SWEEP).exists():  # joining a sweep (another machine, or a restart): its spec wins
        spec = {**runs.read_json(out / runs.SWEEP), "trials": trials}
    runs.write_json(out / runs.SWEEP, spec)
    study = _study(spec)
    log(f"sweep {out}: {spec['study']} in {spec['storage']}, searching {', '.join(spec['space'])}; "
        f"{workers} worker(s)")
    _supervise(spec, workers, study, log)
    return finish(out, log)


def _recipe_part(fixed: dict) -> dict:
    return {k: v for k, v in fixed.items() if k in RECIPE_FIELDS}


def _supervise(spec: dict, workers: int, study, log) -> None:
    """Keep ``workers`` processes running until the study has its trials; replace dead ones."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks

    def start():
        process = context.Process(target=_worker, args=(spec, workers), daemon=False)
        process.start()
        return process

    alive = [start() for _ in range(workers)]
    while alive:
        time.sleep(0.5)
        for process in [p for p in alive if not p.is_alive()]:
            alive.remove(process)
            if process.exitcode != 0:
                failed = _fail_trials_of(study, process.pid)
                log(f"worker {process.pid} died (exit {process.exitcode}); trial(s) {failed or 'none'} marked failed")
                if _finished(study) < spec["trials"]:
                    alive.append(start())


# ----------------------------------------------------------------------------- results


def leaderboard(sweep_dir) -> dict:
    """The trials, best first: number, state, parameters, the kept epoch's validation
    accuracy; and the winner's test accuracy (the only trial ever tested)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / runs.SWEEP).is_file():
        raise UserError(f"not a sweep folder: {runs.SWEEP} is missing ({sweep_dir})")
    spec = runs.read_json(sweep_dir / runs.SWEEP)
    study = _study(spec)
    rows = [{"trial": t.number, "state": t.state.name.lower(), "params": t.params,
             "val_accuracy": t.value, "epochs_run": len(t.intermediate_values),
             "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
             "run_dir": t.user_attrs.get("run_dir")}
            for t in study.get_trials(deepcopy=False)]
    rows.sort(key=lambda r: (r["val_accuracy"] is None, -(r["val_accuracy"] or 0), r["trial"]))
    board = {"sweep": str(sweep_dir), "model": spec["model"], "study": spec["study"], "storage": spec["storage"],
             "trials": rows, "winner": None}
    complete = [r for r in rows if r["state"] == "complete"]
    if complete:
        winner = complete[0]
        metrics = runs.read_metrics(Path(winner["run_dir"])) or {}
        board["winner"] = {**winner, "test_accuracy": metrics.get("accuracy"),
                           **validation_resolution(winner["val_accuracy"], Path(winner["run_dir"]))}
    return board


def validation_resolution(accuracy: float, run_dir: Path) -> dict:
    """How finely the trials' validation split tells them apart: its size and one binomial
    standard error of an accuracy measured on it (a small hold-out, such as ``fast``'s 1,200
    images, ranks trials within about two of these by chance)."""
    images = runs.read_config(run_dir).get("split", {}).get("validation")  # runs older than the split record lack it
    if not images:
        return {"validation_images": None, "standard_error": None}
    return {"validation_images": images, "standard_error": math.sqrt(accuracy * (1 - accuracy) / images)}


def finish(sweep_dir, log=print) -> Path:
    """Test the winner (its metrics.json and report) and draw the search."""
    from ..evaluation.saved import report

    board = leaderboard(sweep_dir)
    if board["winner"] is not None and board["winner"]["test_accuracy"] is None:
        report(board["winner"]["run_dir"], runs.data_dir_for(
            runs.read_config(Path(board["winner"]["run_dir"]))))  # writes metrics.json
        board = leaderboard(sweep_dir)
    plot_search(board, Path(sweep_dir) / PLOT)
    if board["winner"]:
        w = board["winner"]
        log(f"best: trial {w['trial']}, validation {w['val_accuracy']:.4f}, test {w['test_accuracy']:.4f} "
            f"({w['run_dir']})")
    return Path(sweep_dir)


def plot_search(board: dict, path: Path) -> None:
    """search.png: each trial's validation accuracy by state, and the best so far."""
    from ..evaluation.figures import Figure, MaxNLocator, png_bytes

    trials = sorted(board["trials"], key=lambda r: r["trial"])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colours = {"complete": "#2f6fde", "pruned": "#9aa4b2", "fail": "#d1453b", "running": "#f2a93b"}
    for state, colour in colours.items():
        chosen = [(r["trial"], r["val_accuracy"] if r["val_accuracy"] is not None else r["last_reported"])
                  for r in trials if r["state"] == state]
        chosen = [(x, y) for x, y in chosen if y is not None]
        if chosen:
            ax.scatter(*zip(*chosen), c=colour, label=state, s=28, zorder=3)
    best, line = -1.0, []
    for r in trials:
        if r["state"] == "complete" and r["val_accuracy"] is not None:
            best = max(best, r["val_accuracy"])
        line.append(best if best >= 0 else None)
    ax.step([r["trial"] for r in trials], [b if b is not None else float("nan") for b in line], where="post",
            color="#1d2330", lw=1.2, label="best so far")
    ax.set(xlabel="trial", ylabel="validation accuracy (pruned: at the epoch stopped)",
           title=f"sweep of {board['model']}: {len(trials)} trials")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    runs.atomic_write_bytes(path, png_bytes(fig))


def format_leaderboard(board: dict, top: int = 20) -> str:
    lines = [f"sweep {board['sweep']}  model {board['model']}  storage {board['storage']}",
             f"{'trial':>5}  {'state':<8}  {'val acc':>8}  parameters  (pruned: accuracy when stopped)"]
    for r in board["trials"][:top]:
        value = f"{r['val_accuracy']:.4f}" if r["val_accuracy"] is not None else (
            f"({r['last_reported']:.4f})" if r["last_reported"] is not None else "-")
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"{r['trial']:>5}  {r['state']:<8}  {value:>8}  {params}")
    if board["winner"]:
        w = board["winner"]
        test = f"{w['test_accuracy']:.4f}" if w["test_accuracy"] is not None else "not evaluated yet"
        lines.append(f"winner: trial {w['trial']}, test accuracy {test} ({w['run_dir']})")
        if w["validation_images"]:
            lines.append(f"validation: {w['validation_images']:,} images, one standard error "
                         f"{100 * w['standard_error']:.2f} points at the winner's accuracy: "
                         "trials closer than about twice that are not told apart")
    return "\n".join(lines)


def show(sweep_dir) -> str:
    board = leaderboard(sweep_dir)
    plot_search(board, Path(sweep_dir) / PLOT)
    return format_leaderboard(board) + f"\nplot: {Path(sweep_dir) / PLOT}"


__all__ = ["finish", "leaderboard", "run_sweep", "search_space", "show"]
