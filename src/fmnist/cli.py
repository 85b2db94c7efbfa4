"""The ``fmnist`` command: argument parsing only; every command calls the Python API.

Results go to stdout, progress and logs to stderr. Exit codes: 0 success,
1 unexpected failure, 2 user error (one ``error:`` line, maybe a ``hint:``), 130 Ctrl-C,
143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import textwrap
import warnings
from pathlib import Path

from .core.errors import Interrupted, Terminated, UserError, one_line, shell_path

EXAMPLES = {
    "data": """examples:
  fmnist data info                         # release, checksums, class counts, duplicates
  fmnist data info --data ./fashion --json
  fmnist data download                     # fetch the official files into the user cache""",
    "info": """examples:
  fmnist data info                         # the folder fmnist train would use
  fmnist data info --data ./fashion --json""",
    "download": """examples:
  fmnist data download                     # into the user cache, where fmnist looks
  fmnist data download --dir ./fashion""",
    "train": """examples:
  fmnist train                             # the original notebook: its CNN, 10 epochs, batch 32
  fmnist train --model resnet              # another model, trained with its own recipe
  fmnist train --epochs 1 --limit-train 10000 --out runs/quick
  fmnist train --model resnet --lr 0.05 --no-hflip   # the recipe, with two values overridden
  fmnist train --resume runs/notebook-20261127-120000   # continue after Ctrl-C
  fmnist train --seeds 0,1,2 --out runs/seeds          # one run per seed, summary.json: mean ± std""",
    "sweep": """examples:
  fmnist sweep --model resnet --trials 20 --workers 2       # SQLite study in runs/sweep-resnet-<time>/
  fmnist sweep --model notebook --trials 8 --epochs 3       # --epochs given: fixed, not searched
  fmnist sweep --model resnet --trials 50 --storage postgresql://me@db/fmnist --out /shared/sweep
  fmnist sweep --show runs/sweep-resnet-20261201-120000     # leaderboard and search.png""",
    "models": """examples:
  fmnist models                            # name, size, cost and recipe of each model
  fmnist models --json
  fmnist models notebook                   # layer by layer: output shape, parameters, FLOPs""",
    "evaluate": """examples:
  fmnist evaluate runs/notebook-20261127-120000
  fmnist evaluate runs/notebook-20261127-120000 --json
  fmnist evaluate runs/seeds/seed-0 runs/seeds/seed-1 runs/seeds/seed-2 --out runs/ensemble   # ensemble""",
    "bench": """examples:
  fmnist bench                              # minutes on a 2-core CPU (docs/performance.md)
  fmnist bench --json > bench.json""",
    "predict": """examples:
  fmnist predict runs/notebook-20261127-120000 shirt.jpg boot.png   # any size, photo or drawing
  fmnist predict model.onnx *.jpg --top-k 3 --json                  # an exported model: no PyTorch
  fmnist predict model.onnx t10k-images-idx3-ubyte.gz               # IDX or .npy batches of 28x28
  fmnist predict model.onnx photo.jpg --save-preprocessed seen/     # what the model actually saw""",
    "explain": """examples:
  fmnist explain runs/notebook-20261127-120000 shirt.jpg --out why/   # why/0000-shirt.png: input and map
  fmnist explain runs/notebook-20261127-120000 batch.npy --json      # label, probability, 28x28 attribution
  fmnist explain model.onnx shirt.jpg --out why/                     # occlusion through ONNX Runtime""",
    "export": """examples:
  fmnist export runs/notebook-20261127-120000              # writes RUN_DIR/model.onnx
  fmnist export runs/notebook-20261127-120000 --out notebook.onnx
  fmnist export runs/notebook-20261127-120000 --quantize int8   # RUN_DIR/model.int8.onnx, if it passes its gate""",
    "serve": """examples:
  fmnist serve runs/notebook-20261127-120000               # page on http://127.0.0.1:8000/
  fmnist serve model.onnx --host 0.0.0.0 --port 8080
  curl -F images=@shirt.jpg -F images=@boot.png http://127.0.0.1:8000/v1/predict""",
    "report": """examples:
  fmnist report runs/notebook-20261127-120000   # redraws figures/ and report.html""",
    "compare": """examples:
  fmnist train --model fast --seeds 0,1,2,3,4 --out runs/fast
  fmnist train --model fast --seeds 0,1,2,3,4 --lr 0.3 --out runs/fast-lr03
  fmnist compare runs/fast runs/fast-lr03          # difference, 95% CI, Welch's and the paired t-test
  fmnist compare runs/notebook-20261127-120000 runs/fast-20261127-130000 --out compare/
                                                   # run folders: curves, settings, per-class accuracy""",
    "runs": """examples:
  fmnist runs                                      # the run folders under runs/, newest first
  fmnist runs runs/sweep-resnet --sort accuracy    # best first
  fmnist runs --json""",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- commands


def cmd_data_info(args) -> int:
    from .data.dataset import describe, load_dataset

    info = describe(load_dataset(args.data))
    if args.json:
        _print_json(info)
        return 0
    dup = info["duplicates"]
    print(f"release   {info['release']}" + ("" if info["verified"] else "  (not a known release)"))
    print(f"folder    {info['directory']}")
    for part in info["files"].values():
        print(f"  {part['name']:<28} {part['bytes']:>10,} bytes  sha256 {part['sha256']}")
    for split in ("train", "test"):
        s = info[split]
        print(f"{split:<5}     {s['count']:,} images, pixel mean {s['pixel_mean']:.5f} std {s['pixel_std']:.5f}")
    print("per class " + "  ".join(f"{name}: {info['train']['per_class'][name]}/{info['test']['per_class'][name]}"
                                   for name in info["train"]["per_class"]) + "  (train/test)")
    print(f"duplicates: {dup['train']['extra_copies']} extra copies within train, "
          f"{dup['test']['extra_copies']} within test, {dup['train_test_overlap']} test images also in train "
          f"({dup['train_test_label_conflicts']} with a different label)")
    return 0


def cmd_data_download(args) -> int:
    from .data.dataset import default_cache_dir, download_release

    directory = download_release(default_cache_dir() if args.dir is None else Path(args.dir))
    print(directory)
    return 0


def cmd_train(args) -> int:
    from .core.runtime import set_threads, warn_if_oversubscribed
    from .evaluation.metrics import format_report, format_summary
    from .training.config import TrainConfig
    from .training.run import train

    given = _given_train_options(args)
    if args.threads:
        set_threads(args.threads)
    warn_if_oversubscribed()
    config = TrainConfig(**given)
    if args.resume is None:
        config.resolved()  # a wrong setting is refused before the data is read or downloaded
    progress = not args.quiet and sys.stderr.isatty()
    if args.seeds is not None:
        from .core.runs import read_json
        from .training.seeds import SUMMARY, format_seeds, train_seeds

        if args.resume is not None or "seed" in given:
            raise UserError("--seeds runs several seeds; drop --resume and --seed")
        out = train_seeds(config, args.seeds, args.out, args.data, progress=progress, log=_log, track=args.track)
        summary = read_json(out / SUMMARY)
        print(json.dumps(summary, indent=2) if args.json else format_seeds(summary))
        print(f"summary: {out / SUMMARY}", file=sys.stderr)
        return 0
    if args.resume is not None:
        conflicting = [f"--{name.replace('_', '-')}" for name in given] + (["--out"] if args.out else [])
        if conflicting:
            raise UserError(f"--resume continues a run with the settings it started with; "
                            f"drop {' '.join(conflicting)}")
        config = None
    result = train(config, data_dir=args.data, out=args.out, resume=args.resume, progress=progress, log=_log,
                   checkpoint_every=args.checkpoint_every, track=args.track)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.json:
        _print_json({"run_dir": str(result.run_dir), "history": result.history, "metrics": result.metrics})
    else:
        print(format_report(result.metrics))
        print()
        print(format_summary(result.metrics))
        print(f"run folder: {result.run_dir}  (report: {result.run_dir / 'report.html'})")
    return 0


def _given_train_options(args) -> dict:
    """The TrainConfig fields given on the command line (the rest take the recipe's values)."""
    from .models.recipe import RECIPE_FIELDS

    names = (*RUN_OPTIONS, *RECIPE_FIELDS)
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.no_speedups:
        given["speedups"] = False
    return given


def cmd_sweep(args) -> int:
    try:
        from .training.sweep import leaderboard, run_sweep, show
    except ImportError:
        raise UserError("sweeps need Optuna", hint="pip install 'fmnist[sweep]'") from None
    if args.show:
        if args.json:
            _print_json(leaderboard(args.show))
        else:
            print(show(args.show))
        return 0
    fixed = _given_train_options(args)
    model = fixed.pop("model", "notebook")
    seed = fixed.get("seed", 0)
    out = run_sweep(model, args.trials, args.workers, args.storage, args.out, fixed, args.data, seed, log=_log,
                    track=args.track)
    print(show(out))
    return 0


def cmd_models(args) -> int:
    from .models.registry import describe_models

    if args.name:  # one model, layer by layer
        from .models.registry import model_summary

        table = model_summary(args.name)
        _print_json(table.to_dict()) if args.json else print(table)
        return 0
    models = describe_models()
    if args.json:
        _print_json(models)
        return 0
    for entry in models:
        aliases = f" (alias: {', '.join(entry['aliases'])})" if entry["aliases"] else ""
        arguments = ", ".join(f"{k}={v}" for k, v in entry["arguments"].items())
        print(f"{entry['name']}{aliases}: {entry['summary']}")
        print(f"  {entry['architecture']}({arguments}): {entry['parameters']:,} parameters, "
              f"{entry['forward_flops_per_image'] / 1e6:.2f} MFLOP per image forward")
        print("  " + textwrap.fill(", ".join(f"{k}={v}" for k, v in entry["recipe"].items()), 96,
                                   subsequent_indent="  "))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.saved import evaluate
    from .evaluation.metrics import format_report, format_summary

    if len(args.run_dir) > 1 or args.out:
        from .evaluation.ensembles import evaluate_ensemble

        metrics = evaluate_ensemble(args.run_dir, args.data, device=args.device, out=args.out)
    else:
        metrics = evaluate(args.run_dir[0], args.data, device=args.device)
    if args.json:
        _print_json(metrics)
        return 0
    print(format_report(metrics))
    print()
    print(format_summary(metrics))
    if "warning" in metrics:
        _log(f"warning: {metrics['warning']}")
    return 0


def cmd_compare(args) -> int:
    from .evaluation.sidebyside import compare_runs, is_run_dir

    kinds = [is_run_dir(folder) for folder in args.folders]
    if any(kinds) and not all(kinds):
        other = args.folders[kinds.index(False)]
        raise UserError(f"not a run folder: {other}", hint="compare run folders with run folders, or two "
                                                           "folders of seeds ('fmnist train --seeds')")
    if all(kinds):  # run folders; otherwise two folders of seeds
        comparison = compare_runs(*args.folders)
        written = comparison.write(args.out) if args.out else {}
        print(json.dumps({**comparison.to_json(), **{k: str(v) for k, v in written.items()}}, indent=2)
              if args.json else comparison.to_text())
        if written and not args.json:
            _log(f"wrote {written['figure']} and {written['page']}")
        return 0
    from .evaluation.compare import compare_summaries, format_comparison

    if len(args.folders) != 2:
        raise UserError(f"compare takes two folders of seeds, or run folders; got {len(args.folders)} folders "
                        f"that are not all run folders")
    if args.out:
        raise UserError("--out draws run folders side by side; two folders of seeds are compared in text",
                        hint="drop --out (--json gives the comparison as data)")
    result = compare_summaries(*args.folders)
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    return 0


def cmd_runs(args) -> int:
    from .evaluation.runlist import list_runs

    table = list_runs(args.folder, sort=args.sort)
    print(json.dumps(table.to_json(), indent=2) if args.json else table.to_text())
    for problem in table.problems if not args.json else ():
        _log(f"warning: {one_line(problem)}")
    hint = table.resume_hint()
    if hint and not args.json:
        _log(f"hint: {hint}")
    return 0


def cmd_bench(args) -> int:
    import dataclasses

    from .bench import BenchConfig, format_table, run_benchmark

    config = BenchConfig(device=args.device, data_dir=args.data, run_dir=args.run)
    if args.quick:  # a smoke run: every code path, numbers too rough to quote
        config = dataclasses.replace(config, rounds=1, train_steps=5, warmup_steps=2, latency_calls=20,
                                     inference_images=1024, preset_images=256)
    result = run_benchmark(config, log=_log)
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        print(format_table(result))
    return 0


def cmd_report(args) -> int:
    from .evaluation.saved import report

    print(report(args.run_dir, args.data, device=args.device))
    return 0


def _preprocess_changes(args) -> dict:
    return {name: getattr(args, name) for name in ("invert", "autocontrast", "crop", "keep_aspect")
            if getattr(args, name, None) is not None}


def cmd_predict(args) -> int:
    from .data.preprocess import save_png

    from .deploy.classifier import Classifier

    seen = Path(args.save_preprocessed) if args.save_preprocessed else None
    if seen is not None and seen.exists() and not seen.is_dir():
        raise UserError(f"--save-preprocessed names a folder to write into, not a file: {seen}")
    classifier = Classifier.load(args.model, backend=args.backend, preprocess=_preprocess_changes(args),
                                 uncertain_below=args.uncertain_below)
    if len(args.images) == 1:  # one input: its error is the command's error
        answers, skipped = classifier.classify(args.images, top_k=args.top_k), []
    else:  # several: an unreadable one is reported and the others are still answered
        answers, skipped = classifier.classify_readable(args.images, top_k=args.top_k)
        _report_unreadable(skipped, len(args.images))
    if seen is not None:
        for n, answer in enumerate(answers):
            stem = Path(answer.source or "image").name.replace("[", "-").replace("]", "")
            save_png(answer.image, seen / f"{n:04d}-{Path(stem).stem}.png")
    if args.json:
        _print_json([answer.to_dict() for answer in answers])
    else:
        width = max(len(str(answer.source)) for answer in answers)
        for answer in answers:
            others = ", ".join(f"{name} {p:.1%}" for name, p in answer.top_k[1:])
            flag = f"  uncertain: {answer.reason}" if answer.uncertain else ""
            print(f"{answer.source:<{width}}  {answer.label} {answer.probability:.1%}"
                  f"{'  (' + others + ')' if others else ''}{flag}")
    return _status_after(skipped, len(args.images))


def _report_unreadable(skipped: list, total: int) -> None:
    """An error line for each input of a batch that could not be read; a UserError if none could."""
    for _, message in skipped:
        _log(f"error: {message}")
    if len(skipped) == total:
        raise UserError(f"none of the {total} inputs could be read")


def _status_after(skipped: list, total: int) -> int:
    if skipped:
        _log(f"error: {len(skipped)} of {total} inputs could not be read; the rest were answered")
        return 2  # a script sees that something was left out
    return 0


def cmd_explain(args) -> int:
    from .deploy.classifier import Classifier
    from .deploy.explain import explain_prepared, resolve_method

    classifier = Classifier.load(args.model, preprocess=_preprocess_changes(args))
    method = resolve_method(classifier, args.method)  # a method the model cannot do is refused before any reading
    if len(args.images) == 1:  # one input: its error is the command's error
        (batch, sources), skipped = classifier.prepare(args.images), []
    else:  # several: an unreadable one is reported and the others are still explained
        batch, sources, skipped = classifier.prepare_readable(args.images)
        _report_unreadable(skipped, len(args.images))
    found = explain_prepared(classifier, batch, sources, method=method, progress=True)
    if args.out:
        from .core.runs import atomic_write_bytes
        from .evaluation.figures import png_bytes

        for n, item in enumerate(found):
            stem = Path(Path(item.source or "image").name.replace("[", "-").replace("]", "")).stem
            atomic_write_bytes(Path(args.out) / f"{n:04d}-{stem}.png", png_bytes(item.figure()))
        _log(f"{len(found)} explanation(s) in {args.out}")
    if args.json:
        _print_json([item.to_dict() for item in found])
    else:
        width = max(len(str(item.source)) for item in found)
        for item in found:
            doubt = f"  uncertain: {item.reason}" if item.uncertain else ""
            print(f"{item.source!s:<{width}}  {item.label} {item.probability:.1%}  ({item.method}){doubt}")
    return _status_after(skipped, len(args.images))


def cmd_export(args) -> int:
    from .deploy.export import export_onnx
    from .data.preprocess import Preprocess

    path, check = export_onnx(args.run_dir, args.out, args.data, Preprocess(**_preprocess_changes(args)),
                              quantize=args.quantize, overwrite=args.overwrite)
    parity, gate = (check["parity"], check["int8"]) if args.quantize else (check, None)
    _log(f"parity on {parity['images']} test images: top-1 agreement {parity['top1_agreement']:.0%}, "
         f"largest probability difference {parity['max_probability_diff']:.1e}")
    if gate:
        _log(f"int8: top-1 agreement with float {gate['top1_agreement']:.2%} on {gate['images']} test images, "
             f"test accuracy {gate['float_accuracy']:.2%} -> {gate['int8_accuracy']:.2%}, "
             f"{gate['float_bytes']:,} -> {gate['int8_bytes']:,} bytes")
    print(path)
    return 0


def cmd_serve(args) -> int:
    try:
        from .deploy.server import ServeConfig, serve
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn", hint="pip install 'fmnist[serve]'") from None

    config = ServeConfig(max_body_mb=args.max_body_mb, max_images=args.max_images,
                         max_megapixels=args.max_megapixels, batch_window_ms=args.batch_window_ms,
                         max_batch=args.max_batch, top_k=args.top_k, body_timeout_s=args.body_timeout_s)
    serve(args.model, args.host, args.port, config, workers=args.workers, preprocess=_preprocess_changes(args),
          uncertain_below=args.uncertain_below, log=_log)
    return 0


# ----------------------------------------------------------------------------- parser


CLASSES = 10  # Fashion-MNIST's (fmnist.data.idx.CLASS_NAMES, not imported: the parser stays light)

# The run's own settings given as options (TrainConfig's RunSettings); the recipe's options
# are generated from its fields (add_recipe).
RUN_OPTIONS = ("model", "model_args", "seed", "limit_train", "device", "deterministic")


def _whole_number(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return parse


_positive_int = _whole_number(1)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got '{text}'") from None
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability, got '{text}'") from None
    if not 0 <= value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def _knob_value(kind: type, knob):
    """Parses a recipe option and checks it against its field's range, as Recipe.check does."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, "
                                             f"got '{text}'") from None
        problem = knob.problem(value, kind)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {problem}, got {text}")
        return value
    return parse


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seeds separated by commas, e.g. 0,1,2; got '{text}'") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"must be whole numbers of at least 0, e.g. 0,1,2; got '{text}'")
    return seeds


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got '{text}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got '{text}'")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one ``error:`` line and a hint instead of the usage block."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    # Names only: building the parser imports no PyTorch (predict and serve with an exported
    # model never need it).
    from .models.recipe import knobs

    parser = _Parser(
        prog="fmnist", description="Train, evaluate and understand Fashion-MNIST classifiers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'fmnist COMMAND --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    # --debug is accepted before or after the command; SUPPRESS keeps a subcommand's
    # default from overwriting a --debug given before it.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    def command(name, help_text, func):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                                  formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug])
        sub.set_defaults(func=func)
        return sub

    def add_data(sub):
        sub.add_argument("--data", metavar="DIR",
                         help="folder with the four IDX files (default: $FMNIST_DATA, then the user cache, "
                              "then download)")

    data = command("data", "inspect or download the dataset", None)
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION", parser_class=_Parser)

    def data_command(name, help_text, func):
        sub = data_commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                       formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug])
        sub.set_defaults(func=func)
        return sub

    info = data_command("info", "release, checksums, class counts, pixel stats and duplicates of the data",
                        cmd_data_info)
    add_data(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    download = data_command("download", "download the current official release", cmd_data_download)
    download.add_argument("--dir", metavar="DIR", help="target folder (default: the user cache)")

    def add_run_settings(group):
        group.add_argument("--model", metavar="NAME",
                           help="a registered model (default: notebook; 'fmnist models' lists them)")
        group.add_argument("--model-args", type=_json_object, metavar="JSON",
                           help='arguments of the model\'s architecture to change, e.g. \'{"widths": [24, 48, 96]}\'')
        group.add_argument("--seed", type=_whole_number(0), metavar="N",
                           help="seeds everything, the split included (default: 0)")
        group.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on the first N images only")
        group.add_argument("--device", help="auto, cpu or cuda (default: auto)")
        group.add_argument("--deterministic", action="store_true", default=None,
                           help="forbid nondeterministic kernels")
        group.add_argument("--no-speedups", "--no-fast", action="store_true",
                           help="plain PyTorch autograd training steps, without fmnist.speed's CPU kernels")
        group.add_argument("--track", action="append", choices=("tensorboard", "mlflow"), default=[],
                           help="follow the run in TensorBoard (RUN_DIR/tensorboard) or MLflow "
                                "($MLFLOW_TRACKING_URI, else ./mlruns); repeat for both")

    def add_recipe(sub):
        """One option per field of fmnist.models.recipe.Recipe, with its help and its range."""
        recipe = sub.add_argument_group("the recipe (default: the model's own, see 'fmnist models')")
        for name, (kind, knob, _) in knobs().items():
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                recipe.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=knob.help)
            elif knob.choices is not None:
                recipe.add_argument(flag, choices=knob.choices, help=knob.help)
            else:
                recipe.add_argument(flag, type=_knob_value(kind, knob), metavar=knob.metavar, help=knob.help)

    train = command("train", "train a model with its recipe (any option below overrides it) and write a run "
                             "folder", cmd_train)
    run = train.add_argument_group("the run")
    add_run_settings(run)
    run.add_argument("--out", metavar="DIR", help="run folder (default: runs/<model>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its settings win)")
    run.add_argument("--seeds", type=_seed_list, metavar="LIST",
                     help="one run per seed (e.g. 0,1,2) under --out, and summary.json with mean ± std")
    run.add_argument("--checkpoint-every", type=_seconds, metavar="SECONDS",
                     help="also checkpoint inside an epoch this often (default: after each epoch only)")
    run.add_argument("--threads", type=_positive_int, metavar="N",
                     help="CPU threads (default: all cores; give each of several runs its share)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print history and metrics as JSON")
    add_data(run)
    add_recipe(train)

    sweep = command("sweep", "search a model's recipe with Optuna; every trial is a run folder", cmd_sweep)
    study = sweep.add_argument_group("the study")
    study.add_argument("--trials", type=_positive_int, default=20, metavar="N",
                       help="finished trials to reach, all workers together (default: 20)")
    study.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                       help="local worker processes, sharing the cores (default: 1)")
    study.add_argument("--storage", metavar="URL",
                       help="database shared by workers on several machines, e.g. postgresql://user@host/db "
                            "(default: SQLite in the sweep folder)")
    study.add_argument("--out", metavar="DIR", help="sweep folder (default: runs/sweep-<model>-<timestamp>)")
    study.add_argument("--show", metavar="DIR", help="print the leaderboard of a sweep folder and draw its plot")
    study.add_argument("--json", action="store_true", help="with --show: machine-readable")
    fixed = sweep.add_argument_group("fixed settings of every trial (a recipe option given is not searched)")
    add_run_settings(fixed)
    add_data(fixed)
    add_recipe(sweep)

    models = command("models", "list the registered models: size, cost and recipe", cmd_models)
    models.add_argument("name", metavar="NAME", nargs="?", help="one model's layers: output shape, parameters, FLOPs")
    models.add_argument("--json", action="store_true", help="machine-readable output")

    for name, help_text, func in (("evaluate", "test-set metrics of a trained run", cmd_evaluate),
                                  ("report", "redraw a run's figures and report.html", cmd_report)):
        sub = command(name, help_text, func)
        if name == "evaluate":
            sub.add_argument("run_dir", metavar="RUN_DIR", nargs="+",
                             help="a folder written by 'fmnist train'; several: their ensemble (averaged "
                                  "probabilities)")
            sub.add_argument("--out", metavar="DIR", help="write the ensemble's metrics.json here")
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sub.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'fmnist train'")
        add_data(sub)
        sub.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    def add_preprocess(sub):
        group = sub.add_argument_group("preprocessing of image files (default: the model's own settings)")
        group.add_argument("--invert", choices=("auto", "always", "never"),
                           help="make the object light on black: auto inverts a light background")
        group.add_argument("--crop", action=argparse.BooleanOptionalAction, default=None,
                           help="crop to the object (on by default)")
        group.add_argument("--keep-aspect", action=argparse.BooleanOptionalAction, default=None,
                           help="pad to a square before resizing (on by default; off stretches)")
        group.add_argument("--autocontrast", action=argparse.BooleanOptionalAction, default=None,
                           help="background to black, the brightest object pixel to white (on by default)")

    def add_answers(sub):
        sub.add_argument("model", metavar="MODEL", help="a run folder, or a .onnx file from 'fmnist export'")
        sub.add_argument("--top-k", type=_whole_number(1, CLASSES), default=3, metavar="K",
                         help=f"classes shown, 1 to {CLASSES} (default: 3)")
        sub.add_argument("--uncertain-below", type=_probability, metavar="P",
                         help="flag answers whose top probability is below P (default: 0.5)")

    predict = command("predict", "classify image files (any size: photos, drawings) or IDX/.npy batches",
                      cmd_predict)
    add_answers(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE",
                         help="PNG, JPEG, WebP, GIF, BMP, or .npy / IDX files of 28x28 images")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.add_argument("--save-preprocessed", metavar="DIR", help="write the 28x28 images the model saw")
    predict.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                         help="engine for a run folder (an .onnx file always uses ONNX Runtime)")
    add_preprocess(predict)

    explain = command("explain", "where the model looked: a 28x28 evidence map per image (integrated gradients "
                                 "for a run folder, occlusion for an .onnx file)", cmd_explain)
    explain.add_argument("model", metavar="MODEL", help="a run folder, or a .onnx file from 'fmnist export'")
    explain.add_argument("images", nargs="+", metavar="IMAGE",
                         help="PNG, JPEG, WebP, GIF, BMP, or .npy / IDX files of 28x28 images")
    explain.add_argument("--out", metavar="DIR", help="write one PNG per image: the input and the map over it")
    explain.add_argument("--json", action="store_true", help="label, probability and the 28x28 map per image")
    explain.add_argument("--method", choices=("auto", "integrated-gradients", "occlusion"), default="auto",
                         help="auto: integrated gradients for a run folder, occlusion for an .onnx file")
    add_preprocess(explain)

    export = command("export", "write a run's model as an ONNX file with its metadata, after a parity check",
                     cmd_export)
    export.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'fmnist train'")
    export.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (default)")
    export.add_argument("--out", metavar="FILE", help="output file (default: RUN_DIR/model.onnx)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace the file there and its card (without it, an existing file is an error)")
    export.add_argument("--quantize", choices=("int8",),
                        help="int8: static quantization (calibrated on training images), written only if it "
                             "agrees with the float model on 99%% of 1,000 test images and loses at most 0.3 "
                             "points of test accuracy (default: RUN_DIR/model.int8.onnx)")
    add_data(export)
    add_preprocess(export)

    serve = command("serve", "web service and page for a run folder or exported model", cmd_serve)
    add_answers(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1); 0.0.0.0 is every IPv4 address, "
                            ":: every IPv6 one (and, on Linux, IPv4 too with --workers above 1)")
    serve.add_argument("--port", type=_whole_number(0, 65535), default=8000, help="port (default: 8000)")
    serve.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                       help="server processes sharing the port and the cores (default: 1)")
    limits = serve.add_argument_group("limits and batching")
    limits.add_argument("--max-body-mb", type=float, default=5.0, metavar="MB", help="request size (default: 5)")
    limits.add_argument("--max-images", type=_positive_int, default=64, metavar="N",
                        help="images per request (default: 64)")
    limits.add_argument("--max-megapixels", type=float, default=12.0, metavar="MP",
                        help="pixels per image, checked before decoding; WebP, TIFF and progressive "
                             "JPEG get fewer, large JPEGs are decoded scaled down (default: 12)")
    limits.add_argument("--batch-window-ms", type=float, default=2.0, metavar="MS",
                        help="how long a request waits to share a model call (default: 2)")
    limits.add_argument("--max-batch", type=_positive_int, default=256, metavar="N",
                        help="images per model call (default: 256)")
    limits.add_argument("--body-timeout-s", type=float, default=10.0, metavar="S",
                        help="longest pause in an upload before it is answered 408 and closed (default: 10)")
    add_preprocess(serve)

    compare = command("compare", "runs side by side (curves, settings, per-class accuracy), or two sets of "
                                 "seeds: is the difference real? (Welch's t-test)", cmd_compare)
    compare.add_argument("folders", nargs="+", metavar="FOLDER",
                         help="run folders (the first is the reference), or two folders written by "
                              "'fmnist train --seeds' (or their summary.json): differences are B minus A")
    compare.add_argument("--out", metavar="DIR", help="run folders: write compare.png and compare.html here")
    compare.add_argument("--json", action="store_true", help="machine-readable output")

    from .evaluation.runlist import COLUMNS  # a plain dict: imports no PyTorch

    listing = command("runs", "a table of the run folders under a folder, finished or not", cmd_runs)
    listing.add_argument("folder", metavar="DIR", nargs="?", default="runs", help="where to look (default: runs)")
    listing.add_argument("--sort", choices=list(COLUMNS), default="created", metavar="KEY",
                         help=f"column to sort by: {', '.join(COLUMNS)} (default: created, newest first)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    bench = command("bench", "measure training and inference speed against the machine's limit", cmd_bench)
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    add_data(bench)
    bench.add_argument("--run", metavar="RUN_DIR",
                       help="a trained run for the int8 against fp32 rows (default: the untrained notebook CNN, "
                            "speed and size only)")
    bench.add_argument("--quick", action="store_true", help="one short round: checks it runs, not for quoting")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # fmnist's warnings as one line each, like its errors
    try:
        with _names_never_fail_to_print():
            return _run(args)
    finally:
        warnings.showwarning = shown  # main() called from Python leaves the caller's hook in place


@contextlib.contextmanager
def _names_never_fail_to_print():
    """A folder name that is not UTF-8 reaches Python as surrogates, which a UTF-8 terminal's
    strict stdout refuses: such a path is written as the bytes it has on disk, as Python does
    under the C locale, instead of ending the command (a finished training included) with an
    error. (stderr already writes them as escapes.) The stream is put back after."""
    strict = hasattr(sys.stdout, "reconfigure") and sys.stdout.errors == "strict"
    if strict:
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        yield
    finally:
        if strict:
            sys.stdout.reconfigure(errors="strict")


def _run(args) -> int:
    """The command, with every failure turned into its exit status and at most two lines."""
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {one_line(exc.hint)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fmnist runs | head`: the reader is gone, so stop quietly, as cat and ls do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 128 + signal.SIGPIPE
    except OSError as exc:  # unwritable --out, disk full, ...: the user's environment, not a bug
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {one_line(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"interrupted: {one_line(exc)}", file=sys.stderr)
        print(f"hint: fmnist train --resume {shell_path(exc.run_dir)}", file=sys.stderr)
        return 143 if exc.signal_name == "SIGTERM" else 130  # 128 + the signal's number
    except KeyboardInterrupt as stop:  # before training began (the run's setup) or outside it
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            raise
        first_line = textwrap.shorten(one_line(exc), 300)
        print(f"error: unexpected {type(exc).__name__}: {first_line}", file=sys.stderr)
        print("hint: rerun with --debug for the traceback, and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
