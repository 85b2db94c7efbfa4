"""The per-layer table (Keras' model.summary()): every registered model, in the API and the CLI."""

from __future__ import annotations

import json

from fmnist.models.registry import create_model, list_models
from fmnist.models.registry import model_summary
from fmnist.models.summary import count_parameters, forward_flops


def test_every_model_s_table_adds_up_to_its_totals():
    for name in list_models():
        model = create_model(name)
        table = model_summary(name)
        assert sum(row["parameters"] for row in table.rows) == count_parameters(model) == table.parameters, name
        assert table.flops == forward_flops(model), name
        assert table.rows[-1]["output_shape"] == [10], name  # the last layer gives the ten class scores
        assert f"{table.parameters:,}" in str(table) and "<table>" in table._repr_html_()


def test_fmnist_models_name_prints_the_layers(cli):
    result = cli("models", "notebook")
    assert result.returncode == 0, result.stderr
    assert "conv1" in result.stdout and "32x26x26" in result.stdout and "225,034 parameters" in result.stdout
    layers = json.loads(cli("models", "notebook", "--json").stdout)["layers"]
    assert [row["layer"] for row in layers][:2] == ["conv1", "pool"]
    assert cli("models", "no-such-model").returncode == 2


def test_every_model_s_table_reads_the_same_with_the_training_speedups_swapped_in():
    # make_step swaps faster stand-ins into the model (channels-last, fmnist's max-pool and,
    # with AMX, 3x3 convolutions): a summary taken mid-training, from a callback or a
    # notebook, shows the layers as built. Both swaps are forced here, whatever the CPU.
    from fmnist.models.summary import summarize
    from fmnist.speed.convolution import use_fast_convolutions
    from fmnist.speed.pooling import use_fast_max_pools

    swapped_any = False
    for name in list_models():
        model = create_model(name)
        before = summarize(model, name).rows
        swapped = use_fast_convolutions(model) + use_fast_max_pools(model)
        swapped_any |= swapped > 0
        assert summarize(model, name).rows == before, name
    assert swapped_any  # the check above compared something
