"""Statistics over seeds (confidence intervals, Welch's t-test, fmnist compare) and the test
accuracy without the test images that are also in the training set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from fmnist.cli import main
from fmnist.data.dataset import DataSource, FashionMNIST
from fmnist.evaluation.metrics import metrics_on_test_set
from fmnist.evaluation.stats import paired, spread, welch
from fmnist.training.seeds import format_seeds, summarise

FAST = [0.9411, 0.9425, 0.9380, 0.9355, 0.9420]
BEST = [0.9514, 0.9514, 0.9532]


def test_the_confidence_interval_is_the_t_interval_of_the_mean():
    result = spread(FAST)
    low, high = scipy_stats.t.interval(0.95, len(FAST) - 1, loc=np.mean(FAST), scale=scipy_stats.sem(FAST))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high))
    assert result["n"] == 5 and result["min"] == min(FAST) and result["max"] == max(FAST)
    assert spread([0.9])["ci_low"] is None  # one run: no interval


def test_welch_is_scipys_unequal_variance_t_test():
    result = welch(FAST, BEST)
    expected = scipy_stats.ttest_ind(BEST, FAST, equal_var=False)
    assert result["t"] == pytest.approx(expected.statistic) and result["p_value"] == pytest.approx(expected.pvalue)
    assert result["difference"] == pytest.approx(np.mean(BEST) - np.mean(FAST))
    assert result["ci_low"] < result["difference"] < result["ci_high"] and result["significant"]
    same = welch(FAST, [a + 1e-5 for a in FAST])
    assert not same["significant"] and same["ci_low"] < 0 < same["ci_high"]
    assert welch([0.9], BEST)["p_value"] is None  # one run on a side: nothing to test
    constant = welch([0.99] * 5, [0.99] * 3)  # the means differ by rounding only
    assert constant["difference"] == 0.0 and constant["p_value"] is None and "no spread" in constant["note"]
    moved = welch([0.99] * 3, [0.995] * 3)  # was "p = 0, significant" beside the paired test's "no spread"
    assert moved["difference"] == pytest.approx(0.005) and moved["p_value"] is None


def test_the_paired_test_is_scipys_over_the_seeds_both_sides_have():
    base = dict(enumerate(FAST))
    changed = {seed: value + 0.001 * (1 + seed % 2) for seed, value in base.items()}
    changed[9] = 0.5  # a seed only one side has is not a pair
    result = paired(base, changed)
    expected = scipy_stats.ttest_rel([changed[s] for s in base], FAST)
    assert result["t"] == pytest.approx(expected.statistic) and result["p_value"] == pytest.approx(expected.pvalue)
    assert result["n"] == 5 and result["df"] == 4 and result["significant"]
    assert result["ci_low"] < result["difference"] < result["ci_high"] and result["difference"] == pytest.approx(0.0014)
    assert not welch(FAST, [changed[s] for s in base])["significant"]  # what pairing buys: the seeds' spread is gone
    assert paired(base, {0: 0.95})["p_value"] is None  # one pair: nothing to test
    shifted = paired(base, {seed: value + 0.002 for seed, value in base.items()})  # no spread: no test
    assert shifted["p_value"] is None and shifted["difference"] == pytest.approx(0.002) and "same amount" in shifted["note"]
    constant = paired({0: 0.99, 1: 0.97, 2: 0.93}, {0: 0.99, 1: 0.97, 2: 0.93})
    assert constant["difference"] == 0.0 and constant["p_value"] is None


def test_compare_reads_two_seed_folders_and_says_whether_the_difference_is_real(tmp_path, capsys):
    for name, accuracies in (("fast", FAST), ("best", BEST)):
        rows = [{"seed": i, "accuracy": a, "top2_accuracy": 0.99, "best_epoch": 4, "seconds": 50.0}
                for i, a in enumerate(accuracies)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summarise(name, rows, "release")))
    assert main(["compare", str(tmp_path / "fast"), str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "significant, Welch's t-test" in out and "+1." in out
    assert "paired t-test over the 3 seeds both ran" in out  # seeds 0-2 are on both sides
    assert main(["compare", str(tmp_path / "fast"), str(tmp_path / "best"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tests"]["accuracy"]["significant"] is True
    pairs = scipy_stats.ttest_rel(BEST, FAST[:3])
    assert result["paired"]["accuracy"]["p_value"] == pytest.approx(pairs.pvalue)
    assert result["paired"]["seconds"]["difference"] == 0.0
    assert main(["compare", str(tmp_path / "fast"), str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err


@pytest.mark.parametrize("runs, message", [
    ([1, 2], "run 0 is not a record"),
    ([{"seed": 0, "accuracy": float("nan")}], "accuracy nan, not a number from 0 to 1"),
    ([{"seed": 0, "accuracy": float("inf")}], "accuracy inf, not a number from 0 to 1"),
    ([{"seed": 0, "accuracy": "0.9"}], "accuracy '0.9', not a number from 0 to 1"),
    ([{"seed": 0, "accuracy": True}], "accuracy True, not a number from 0 to 1"),
    ([{"seed": 0, "accuracy": 10 ** 400}], "accuracy an integer of 401 digits, not a number"),
    ([{"seed": 0, "accuracy": 1e100}, {"seed": 1, "accuracy": 0.5}], "accuracy 1e+100, not a number from 0 to 1"),
    ([{"seed": 0, "accuracy": -0.1}], "accuracy -0.1, not a number from 0 to 1"),
    ([{"seed": 0, "seconds": 1e308}], "seconds 1e+308, not a number from 0 to 31536000"),
    ([{"seed": 0, "accuracy": 0.9}, {"seed": 0, "accuracy": 0.8}], "seed 0 appears in two runs"),
    ([{"seed": 0.0, "accuracy": 0.9}], "seed 0.0, not a whole number"),
    ([{"seed": "0", "accuracy": 0.9}], "seed '0', not a whole number"),
])
def test_a_summary_compare_cannot_use_is_one_error_line(tmp_path, capsys, runs, message):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    (good / "summary.json").write_text(json.dumps({"runs": [{"seed": s, "accuracy": a} for s, a in enumerate(FAST)]}))
    (bad / "summary.json").write_text(json.dumps({"runs": runs}))
    for order in ((good, bad), (bad, good)):
        assert main(["compare", *map(str, order)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("summary, message", [
    ({"model": float("nan")}, "model is nan, not one line of text"),
    ({"model": "fast\nsecond minus first: FAKE"}, "not one line of text"),
    ({"data_release": "\x1b[31mred"}, "data_release is '\\x1b[31mred', not one line of text"),
    ({"data_release": ["a"]}, "data_release is ['a'], not one line of text"),
])
def test_a_summary_whose_labels_are_not_one_line_of_text_is_refused(tmp_path, capsys, summary, message):
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "runs": [{"seed": 0, "accuracy": 0.9}]}))
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_compare_of_summaries_at_the_edges(tmp_path, capsys):
    def summary(name, runs, **top):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"runs": runs, **top}))
        return str(tmp_path / name)

    # Values so close that the squared variances underflow: still a test, not a crash.
    tiny = summary("tiny", [{"seed": 0, "accuracy": 0.0}, {"seed": 1, "accuracy": 2e-85}])
    assert main(["compare", tiny, tiny]) == 0
    capsys.readouterr()
    # The same +1 point on every seed, whatever the float rounding of the differences.
    base = [0.8261, 0.812, 0.8507]
    a = summary("a", [{"seed": s, "accuracy": v} for s, v in enumerate(base)], seeds=[0, 1, 2, 3])
    b = summary("b", [{"seed": s, "accuracy": v + 0.01} for s, v in enumerate(base)])
    assert main(["compare", a, b, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["paired"]["accuracy"]["p_value"] is None and "same amount" in result["paired"]["accuracy"]["note"]
    assert result["first"]["seeds"] == [0, 1, 2]  # the runs' seeds, not the header's claim
    # Nothing in common to test: said, not a bare header.
    only_seconds = summary("seconds", [{"seed": 0, "seconds": 1.0}, {"seed": 1, "seconds": 2.0}])
    assert main(["compare", a, only_seconds]) == 0
    assert "no measure in common" in capsys.readouterr().out
    # --out draws run folders only: asking it of summaries is a mistake, said.
    assert main(["compare", a, b, "--out", str(tmp_path / "drawn")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "drawn").exists()
    # An integer longer than Python converts (4,300 digits): one line, without Python's advice.
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "summary.json").write_text('{"runs": [{"seed": 0, "accuracy": 1' + "0" * 5000 + "}]}")
    assert main(["compare", a, str(tmp_path / "long")]) == 2
    err = capsys.readouterr().err
    assert "more than 4,300 digits" in err and "sys." not in err and len(err.strip().splitlines()) == 1
    # JSON nested thousands deep: one error line.
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["compare", a, str(tmp_path / "deep")]) == 2
    assert "nested too deeply" in capsys.readouterr().err


def test_runs_that_do_not_name_their_seed_are_not_paired(tmp_path, capsys):
    for name, accuracies in (("a", FAST), ("b", BEST)):
        rows = [{"accuracy": a} for a in accuracies]
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"model": name, "runs": rows}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "Welch's t-test" in out and "paired" not in out


def test_a_seed_summary_holds_each_mean_with_its_interval():
    rows = [{"seed": i, "accuracy": a, "deduplicated_accuracy": a - 1e-4, "top2_accuracy": 0.99, "best_epoch": 4,
             "test_ece": 0.01, "seconds": 50.0} for i, a in enumerate(FAST)]
    summary = summarise("fast", rows, "release")
    assert summary["accuracy"]["ci_low"] < summary["accuracy"]["mean"] < summary["accuracy"]["ci_high"]
    assert summary["deduplicated_accuracy"]["n"] == 5
    assert "95% CI" in format_seeds(summary)


def test_test_images_also_in_training_are_left_out_of_the_deduplicated_accuracy():
    train = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    test = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    test[[3, 7]] = train[[0, 5]]  # two test images that are also training images
    data = FashionMNIST(train, torch.arange(50) % 10, test, torch.arange(20) % 10,
                        DataSource(directory="synthetic", release="unverified copy", verified=False))
    logits = torch.nn.functional.one_hot(data.test_labels, 10).float()
    logits[3] = logits[3].roll(1)  # wrong on a seen image only
    metrics = metrics_on_test_set(logits, data)
    assert metrics["accuracy"] == pytest.approx(19 / 20)
    assert metrics["deduplicated"] == {"count": 18, "excluded": 2, "accuracy": 1.0,
                                       "loss": pytest.approx(metrics["deduplicated"]["loss"])}


@pytest.mark.slow
def test_the_real_test_set_holds_ten_images_of_the_training_set(dataset):
    from fmnist.data.dataset import find_duplicates

    seen = dataset.test_seen_in_training()
    assert int(seen.sum()) == 10
    overlaps = find_duplicates(dataset)["overlaps"]  # another method: sorted keys, not hashes
    assert sorted(o["test_index"] for o in overlaps) == seen.nonzero().flatten().tolist()
