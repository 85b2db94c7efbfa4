"""What happens during a run, for whatever follows it: the console, the checkpoint, the report,
experiment trackers, a sweep's pruner.

A ``Listener`` overrides the events it cares about; the run calls every listener in the
order given, so the checkpoint (the state of record) is saved before anything else hears of
an epoch, and a listener that raises (a sweep pruning a trial) stops a run whose epoch is
already safe.
"""

from __future__ import annotations


class Listener:
    """Follows a run. Every method does nothing unless overridden."""

    def on_run_start(self, run) -> None:
        """The run is set up (fresh or resumed); ``run.start_epoch`` is the first epoch to train."""

    def on_epoch_end(self, run, row: dict, best: bool) -> None:
        """An epoch was trained and validated: its history row, and whether its weights are kept."""

    def on_checkpoint(self, run, epoch: int, position: int) -> None:
        """checkpoint.pt was written after ``epoch`` complete epochs (and ``position`` steps of the next)."""

    def on_run_end(self, run, metrics: dict, test_logits) -> None:
        """The kept epoch was tested: its metrics (written to metrics.json after every listener)."""

    def inside_epoch(self, run, epoch: int):
        """(seconds, call) to be called every that many seconds inside ``epoch`` with (steps done,
        their losses, correct so far), or None (the checkpoint inside epochs uses it)."""
        return None


class Events:
    """The run's listeners, called in order."""

    def __init__(self, listeners=()):
        self.listeners = list(listeners)

    def run_start(self, run) -> None:
        for listener in self.listeners:
            listener.on_run_start(run)

    def epoch_end(self, run, row: dict, best: bool) -> None:
        for listener in self.listeners:
            listener.on_epoch_end(run, row, best)

    def checkpoint(self, run, epoch: int, position: int) -> None:
        for listener in self.listeners:
            listener.on_checkpoint(run, epoch, position)

    def run_end(self, run, metrics: dict, test_logits) -> None:
        for listener in self.listeners:
            listener.on_run_end(run, metrics, test_logits)

    def inside_epoch(self, run, epoch: int):
        """The first listener's request to be called inside the epoch (one is all the loop takes)."""
        return next((request for listener in self.listeners
                     if (request := listener.inside_epoch(run, epoch)) is not None), None)
