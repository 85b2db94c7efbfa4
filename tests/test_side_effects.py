"""The library leaves its caller alone: a run, a report, the figures and the notebook helpers
(plot_*, compare_runs, the reprs) change nothing in the process that called them
(matplotlib's backend and figures, PyTorch's flags and threads, the environment, the
warnings hook)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fmnist


@pytest.mark.slow  # a training on the real data
def test_a_run_and_its_report_leave_the_callers_process_as_they_found_it(dataset, tmp_path):
    import matplotlib

    matplotlib.use("pdf")  # what a caller chose: not what fmnist draws with
    import matplotlib.pyplot as plt

    figure = plt.figure()
    callers_threads = torch.get_num_threads()
    threads = callers_threads - 1 if callers_threads > 1 else 2  # not the default, whatever it is
    torch.set_num_threads(threads)
    environment, hook = dict(os.environ), warnings.showwarning
    # deterministic=True switches PyTorch's deterministic algorithms on for the run
    result = fmnist.train(fmnist.TrainConfig(epochs=1, limit_train=500, deterministic=True), data=dataset,
                          out=tmp_path / "run", progress=False, log=lambda line: None)
    fmnist.report(result.run_dir, data=dataset)
    from fmnist.evaluation import figures

    figures.curves(result.history)
    drawn = [helper(result) for helper in (fmnist.plot_curves, fmnist.plot_confusion_matrix, fmnist.plot_reliability)]
    drawn += [fmnist.plot_samples(result, data=dataset), fmnist.plot_top_losses(result, data=dataset),
              fmnist.compare_runs(result, result.run_dir).figure]
    for fig in drawn:
        fig._repr_png_()  # what a notebook does with a cell's value
    result._repr_html_(), dataset._repr_html_(), fmnist.list_runs(tmp_path)._repr_html_()
    assert matplotlib.get_backend() == "pdf"
    assert plt.get_fignums() == [figure.number] and plt.gcf() is figure
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == environment
    assert warnings.showwarning is hook
    plt.close(figure)
    torch.set_num_threads(callers_threads)  # the tests after this one get the process as pytest set it up


def test_a_stop_while_torch_inductor_is_half_imported_stays_a_stop(monkeypatch):
    """A Ctrl-C or SIGTERM can land while the optimizer's first step imports torch._inductor;
    putting the process back must not import it again and turn the stop into that import's
    error. (A --deterministic run imported it whole before training, when it set the flag.)"""
    import sys
    import types

    from fmnist.core.runtime import settings_restored

    with pytest.raises(KeyboardInterrupt):
        with settings_restored():
            for name in [name for name in sys.modules if name.startswith("torch._inductor")]:
                monkeypatch.delitem(sys.modules, name)
            half = types.ModuleType("torch._inductor")
            half.__path__ = []  # its submodules cannot be found: importing one fails, as in a half import
            monkeypatch.setitem(sys.modules, "torch._inductor", half)
            raise KeyboardInterrupt
    monkeypatch.undo()
    assert not torch.are_deterministic_algorithms_enabled()
