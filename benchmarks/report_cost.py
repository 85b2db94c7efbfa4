"""What the report's understanding sections cost a run: build_report with and without the
model (evidence maps of the top losses, the embedding map), and t-SNE alone.

    python benchmarks/report_cost.py RUN_DIR [--data DIR] [--repeats 3]

Prints wall and CPU seconds (this process, all threads) of each; the difference is what every
training run pays. The run folder's figures/ and report.html are redrawn.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _timed(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", help="data folder (default: the one the run used)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import fmnist
    from fmnist.core import runs
    from fmnist.data.dataset import to_float
    from fmnist.evaluation import embedding
    from fmnist.evaluation.metrics import metrics_on_test_set
    from fmnist.evaluation.report import build_report
    from fmnist.evaluation.saved import load_run_model
    from fmnist.speed.inference import predict_logits

    data = fmnist.load_dataset(runs.data_dir_for(runs.read_config(args.run_dir), args.data))
    model, _ = load_run_model(args.run_dir)
    logits = predict_logits(model, to_float(data.test_images))
    metrics = metrics_on_test_set(logits, data) | {
        k: v for k, v in (runs.read_metrics(args.run_dir) or {}).items() if k == "calibration"}
    features = embedding.penultimate_features(model, to_float(data.test_images[embedding.sample_indices(
        data.test_labels.numpy())]))
    cases = {"report without the model": lambda: build_report(args.run_dir, data, logits, metrics),
             "report with the model": lambda: build_report(args.run_dir, data, logits, metrics, model),
             f"t-SNE of {len(features):,} points": lambda: embedding.project(features)}
    for name, case in cases.items():
        times = [_timed(case) for _ in range(args.repeats)]
        print(f"{name}: wall {statistics.median(t[0] for t in times):.2f} s, "
              f"CPU {statistics.median(t[1] for t in times):.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
