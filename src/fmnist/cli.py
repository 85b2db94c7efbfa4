"""The ``fmnist`` command: argument parsing only; every command calls the Python API.

Results go to stdout, progress and logs to stderr. Exit codes: 0 success,
1 unexpected failure, 2 user error (one ``error:`` line, maybe a ``hint:``), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from .errors import Interrupted, UserError

EXAMPLES = {
    "data": """examples:
  fmnist data info                         # release, checksums, class counts, duplicates
  fmnist data info --data ./fashion --json
  fmnist data download                     # fetch the official files into the user cache""",
    "train": """examples:
  fmnist train                             # the original notebook: seed CNN, 10 epochs, batch 32
  fmnist train --epochs 1 --limit-train 10000 --out runs/quick
  fmnist train --resume runs/seed-20261127-120000   # continue after Ctrl-C""",
    "evaluate": """examples:
  fmnist evaluate runs/seed-20261127-120000
  fmnist evaluate runs/seed-20261127-120000 --json""",
    "bench": """examples:
  fmnist bench                              # under a minute on a 2-core CPU
  fmnist bench --json > bench.json""",
    "report": """examples:
  fmnist report runs/seed-20261127-120000   # redraws figures/ and report.html""",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- commands


def cmd_data_info(args) -> int:
    from .data import describe, load_dataset

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
    from .data import default_cache_dir, download_release

    directory = download_release(default_cache_dir() if args.dir is None else Path(args.dir))
    print(directory)
    return 0


def cmd_train(args) -> int:
    from .metrics import format_report, format_summary
    from .training import TrainConfig, train

    given = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    config = TrainConfig(**given)
    if args.resume is not None:
        conflicting = [f"--{name.replace('_', '-')}" for name in given] + (["--out"] if args.out else [])
        if conflicting:
            raise UserError(f"--resume continues a run with the settings it started with; "
                            f"drop {' '.join(conflicting)}")
        config = None
    result = train(config, data_dir=args.data, out=args.out, resume=args.resume,
                   progress=not args.quiet and sys.stderr.isatty(), log=_log)
    if args.json:
        _print_json({"run_dir": str(result.run_dir), "history": result.history, "metrics": result.metrics})
    else:
        print(format_report(result.metrics))
        print()
        print(format_summary(result.metrics))
        print(f"run folder: {result.run_dir}  (report: {result.run_dir / 'report.html'})")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate
    from .metrics import format_report, format_summary

    metrics = evaluate(args.run_dir, args.data, device=args.device)
    if args.json:
        _print_json(metrics)
        return 0
    print(format_report(metrics))
    print()
    print(format_summary(metrics))
    if "warning" in metrics:
        _log(f"warning: {metrics['warning']}")
    return 0


def cmd_bench(args) -> int:
    import dataclasses

    from .bench import BenchConfig, format_table, run_benchmark

    config = BenchConfig(device=args.device, data_dir=args.data)
    if args.quick:  # a smoke run: every code path, numbers too rough to quote
        config = dataclasses.replace(config, rounds=1, train_steps=5, warmup_steps=2, latency_calls=20,
                                     inference_images=1024)
    result = run_benchmark(config, log=_log)
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        print(format_table(result))
    return 0


def cmd_report(args) -> int:
    from .evaluation import report

    print(report(args.run_dir, args.data, device=args.device))
    return 0


# ----------------------------------------------------------------------------- parser


# Options that become TrainConfig fields; unset ones (None) take TrainConfig's defaults.
TRAIN_OPTIONS = ("model", "epochs", "batch_size", "lr", "seed", "val_fraction", "limit_train", "device",
                 "precision", "deterministic")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models import list_models
    from .runtime import PRECISIONS

    parser = argparse.ArgumentParser(
        prog="fmnist", description="Train, evaluate and understand Fashion-MNIST classifiers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'fmnist COMMAND --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --debug is accepted before or after the command; SUPPRESS keeps a subcommand's
    # default from overwriting a --debug given before it.
    debug = argparse.ArgumentParser(add_help=False)
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
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    info = data_commands.add_parser("info", help="release, checksums, class counts, pixel stats, duplicates",
                                    parents=[debug])
    add_data(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_data_info)
    download = data_commands.add_parser("download", help="download the current official release", parents=[debug])
    download.add_argument("--dir", metavar="DIR", help="target folder (default: the user cache)")
    download.set_defaults(func=cmd_data_download)

    train = command("train", "train a model and write a run folder", cmd_train)
    train.add_argument("--model", choices=list_models(), help="model name (default: seed)")
    train.add_argument("--epochs", type=_positive_int, metavar="N", help="default: 10")
    train.add_argument("--batch-size", type=_positive_int, metavar="N", help="default: 32")
    train.add_argument("--lr", type=float, help="Adam learning rate (default: 0.001)")
    train.add_argument("--seed", type=int, metavar="N", help="seeds everything, the split included (default: 0)")
    train.add_argument("--val-fraction", type=float, metavar="F",
                       help="stratified validation hold-out from train; 0 keeps the last epoch (default: 0.1)")
    train.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on the first N images only")
    train.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    train.add_argument("--precision", choices=PRECISIONS,
                       help="auto = bf16 autocast on GPUs with native bf16, else fp32; bf16 on a CPU pays off "
                            "with AMX/AVX512-BF16")
    train.add_argument("--deterministic", action="store_true", default=None, help="forbid nondeterministic kernels")
    train.add_argument("--out", metavar="DIR", help="run folder (default: runs/<model>-<timestamp>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its settings win)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print history and metrics as JSON")
    add_data(train)

    for name, help_text, func in (("evaluate", "test-set metrics of a trained run", cmd_evaluate),
                                  ("report", "redraw a run's figures and report.html", cmd_report)):
        sub = command(name, help_text, func)
        sub.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'fmnist train'")
        add_data(sub)
        sub.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        if name == "evaluate":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
    bench = command("bench", "measure training and inference speed against the machine's limit", cmd_bench)
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    add_data(bench)
    bench.add_argument("--quick", action="store_true", help="one short round: checks it runs, not for quoting")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --out, disk full, ...: the user's environment, not a bug
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        print(f"hint: fmnist train --resume {exc.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            raise
        first_line = textwrap.shorten(str(exc), 300)
        print(f"error: unexpected {type(exc).__name__}: {first_line}", file=sys.stderr)
        print("hint: rerun with --debug for the traceback, and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
