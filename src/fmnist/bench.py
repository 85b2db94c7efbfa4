"""``fmnist bench``: how close the trainer and the predict path come to the machine's limit.

Everything is measured in one process and one run, so that ratios are meaningful on a
shared, noisy machine: the contenders are interleaved round by round and each figure is
the median of the rounds. Absolute numbers drift from run to run; ratios much less.

Measured:
  * the machine's fp32 GEMM rate (a large square matmul on all threads): the ceiling;
  * training throughput of the notebook CNN with fmnist's own epoch loop
    (``training.loop.train_one_epoch`` with the step ``speed.make_step`` picks) at batch 32 and
    128, fp32 and, where the hardware computes bf16 natively, bf16 autocast (elsewhere bf16 is
    emulated: on an AVX2 CPU one bf16 GEMM of the ceiling's size took about 14 s, and the
    ceiling times 13 of them, so neither it nor the bf16 rows are measured);
  * the same CNN (the same ``fmnist.models.NotebookCNN``) in a textbook PyTorch loop
    (DataLoader over a TensorDataset, NCHW, Adam, ``loss.item()`` every step), written
    below so the baseline always exists; the ratio fmnist / textbook at the same batch size;
  * inference throughput of ``Classifier.predict_proba`` on 16, 256 and 1024 images at once,
    and its single-image latency (p50, p99), for each backend (PyTorch, ONNX Runtime);
  * int8 against fp32 in ONNX Runtime (``fmnist export --quantize int8``'s quantization):
    images/s at batch 256, file size, and, for a trained run (``--run``), test accuracy and
    top-1 agreement; without a run, the untrained notebook CNN gives speed and size only;
  * when TensorFlow happens to be installed, the Keras seed model's ``fit`` throughput.
Training and inference run on real Fashion-MNIST images (a seeded random sample of the
training set; the data is found as ``fmnist train`` finds it). Speed depends on the data:
the routed backward of conv2 (``fmnist.speed.kernels``) works only for the conv outputs that
win their pooling window and pass the ReLU (docs/history.md: why noise data misleads).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .core.precision import native_bf16, resolve_precision
from .core.runtime import environment, resolve_device
from .data.dataset import FashionMNIST, load_dataset, to_float
from .deploy.classifier import Classifier
from .models import keras_notebook
from .models.registry import create_model
from .models.summary import layer_flops, training_flops
from .speed import executed_training_flops, make_step
from .training.config import TrainConfig
from .training.loop import train_one_epoch
from .training.optim import make_optimizer


@dataclass
class BenchConfig:
    rounds: int = 5              # medians over 5 interleaved rounds tame a noisy machine
    train_steps: int = 60        # optimizer steps timed per round and contender
    warmup_steps: int = 20       # first steps pay for allocation and kernel selection
    batch_sizes: tuple = (32, 128)
    precisions: tuple = ("fp32", "bf16")  # bf16 only where native (run_benchmark)
    inference_batches: tuple = (16, 256, 1024)  # 16: a web request's worth, not just bulk
    inference_images: int = 8192  # images predicted per round and backend
    latency_calls: int = 300     # enough for a stable p99
    presets: tuple | None = None  # None: the presets meant for the device (below)
    preset_images: int = 4096    # images per round for each preset, at its recipe's batch size
    device: str = "auto"
    run_dir: str | None = None   # a trained run for the int8 row's accuracy (None: untrained notebook CNN)
    data_dir: str | None = None  # as for 'fmnist train': --data, then $FMNIST_DATA, the cache, a download


@dataclass
class BenchResult:
    environment: dict
    data: dict                           # which release the images came from
    gemm_gflops: float
    gemm_gflops_bf16: float | None       # the presets train in bf16 where the hardware has it (None: emulated)
    train_flops_per_image: int           # the notebook's network as written: the usual count
    forward_flops_per_image: int
    executed_train_flops_per_image: int  # what fmnist's notebook step actually computes (fmnist.speed)
    training: list[dict] = field(default_factory=list)
    inference: list[dict] = field(default_factory=list)
    latency_ms: dict = field(default_factory=dict)
    keras: list[dict] = field(default_factory=list)
    presets: list[dict] = field(default_factory=list)
    quantized: list[dict] = field(default_factory=list)  # fp32 and int8 ONNX models side by side


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 10, dtype=torch.float32) -> float:
    """Matmul rate in ``dtype`` on all threads: the ceiling a dense CNN step could reach (bf16:
    the matrix units where the CPU has them, AMX or AVX512-BF16).

    The best of the repeats, not the median: a ceiling is what the machine can do, and on a
    shared machine slow repeats measure the neighbours (this also keeps fractions honest)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return max(rates)


def training_sample(data: FashionMNIST, n: int, device: torch.device, seed: int = 0):
    """n training images as the trainer holds them (float [n, 1, 28, 28] in [0, 1]), with labels.

    Sampled with replacement only when more are asked for than the training set holds."""
    generator = torch.Generator().manual_seed(seed)
    count = len(data.train_labels)
    index = (torch.randperm(count, generator=generator)[:n] if n <= count
             else torch.randint(0, count, (n,), generator=generator))
    return to_float(data.train_images[index]).to(device), data.train_labels[index].to(device)


# ----------------------------------------------------------------------------- contenders


def notebook_step(device: torch.device, precision: str = "fp32", speedups: bool = True):
    """The training step fmnist takes for the notebook CNN with its recipe on this device."""
    config = TrainConfig().resolved()
    model = create_model("notebook").to(device)
    return make_step(model, make_optimizer(model, config), precision=precision, device=device, speedups=speedups)


def _epoch_loop(step, data: FashionMNIST, batch_size: int, steps: int, device: torch.device):
    """A closure that runs up to ``steps`` optimizer steps of fmnist's own epoch loop with ``step``."""
    images, labels = training_sample(data, steps * batch_size, device)
    generator = torch.Generator().manual_seed(0)

    def run(n_steps: int = steps):
        train_one_epoch(step, images[:n_steps * batch_size], labels[:n_steps * batch_size], batch_size, generator)
    return run


def fmnist_trainer(data: FashionMNIST, batch_size: int, steps: int, device: torch.device, precision: str,
                   speedups: bool = True):
    """The notebook CNN's steps through fmnist's own epoch loop."""
    return _epoch_loop(notebook_step(device, precision, speedups), data, batch_size, steps, device)


def textbook_trainer(data: FashionMNIST, batch_size: int, steps: int, device: torch.device):
    """The loop from a PyTorch tutorial: DataLoader, NCHW, Adam, per-step ``.item()``."""
    from torch.utils.data import DataLoader, TensorDataset

    model = create_model("notebook").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    images, labels = training_sample(data, steps * batch_size, torch.device("cpu"))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)

    def run(n_steps: int = steps):
        model.train()
        running_loss, correct = 0.0, 0
        for step, (x, y) in enumerate(loader):
            if step == n_steps:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            outputs = model(x)
            loss = criterion(outputs, y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            correct += (outputs.argmax(1) == y).sum().item()
    return run


def keras_trainer(data: FashionMNIST, batch_size: int, steps: int):
    """The original notebook's Keras model and ``fit``, if TensorFlow is installed."""
    import numpy as np
    from tensorflow import keras  # optional, never a dependency

    model = keras_notebook.build(keras)
    images, labels = training_sample(data, steps * batch_size, torch.device("cpu"))
    images = images.numpy().transpose(0, 2, 3, 1)  # Keras takes NHWC
    labels = np.eye(10, dtype=np.float32)[labels.numpy()]  # one-hot, as the notebook did

    def run(n_steps: int = steps):
        model.fit(images[:n_steps * batch_size], labels[:n_steps * batch_size],
                  batch_size=batch_size, epochs=1, verbose=0)
    return run


# ----------------------------------------------------------------------------- measuring


# `best` is a GPU recipe: on a CPU a round of it would take minutes
PRESETS_FOR = {"cpu": ("fast", "best-cpu"), "cuda": ("fast", "best-cpu", "best")}


def preset_trainer(data: FashionMNIST, name: str, images: int, device: torch.device):
    """(closure running fmnist's epoch loop with the preset's own step and batch size, the
    step, images per call, batch size): what ``fmnist train --model NAME`` runs, minus
    augmentation and validation."""
    config = TrainConfig(model=name, device=str(device)).resolved()
    model = create_model(name, **config.model_args).to(device)
    step = make_step(model, make_optimizer(model, config), precision=resolve_precision(config.precision, device),
                     label_smoothing=config.label_smoothing, device=device)
    steps = max(1, images // config.batch_size)
    return _epoch_loop(step, data, config.batch_size, steps, device), step, steps * config.batch_size, config.batch_size


def _presets(data: FashionMNIST, config: BenchConfig, device: torch.device, result: "BenchResult") -> list[dict]:
    """Each preset's step: images/s, and its executed GFLOP/s against the fp32 and bf16 GEMM rates."""
    rows = []
    for name in config.presets or PRESETS_FOR.get(device.type, ("fast",)):
        run, step, images, batch = preset_trainer(data, name, config.preset_images, device)
        rate = _interleaved_rates({name: run}, images, config, device)[name]
        executed = executed_training_flops(step)
        gflops = rate * executed / 1e9
        rows.append({"preset": name, "batch": batch, "precision": step.precision,
                     "images_per_second": rate, "executed_flops_per_image": executed, "executed_gflops": gflops,
                     "hardware_use": gflops / result.gemm_gflops,
                     "of_bf16_gemm": gflops / result.gemm_gflops_bf16 if result.gemm_gflops_bf16 else None,
                     "step": step.name})
    return rows


def _interleaved_rates(contenders: dict, images_per_call: int, config: BenchConfig, device) -> dict:
    """images/s per contender: warm each up, then alternate them for ``rounds`` rounds."""
    for run in contenders.values():
        run(config.warmup_steps)
    rates = {name: [] for name in contenders}
    for _ in range(config.rounds):
        for name, run in contenders.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            rates[name].append(images_per_call / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def _inference(data: FashionMNIST, config: BenchConfig, device: torch.device) -> tuple[list[dict], dict]:
    """Throughput and single-image latency of Classifier.predict_proba, per backend."""
    model = create_model("notebook").to(device).eval()
    classifiers = {"torch": Classifier(model, backend="torch")}
    auto = Classifier(model, backend="auto")
    if auto.backend != "torch":
        classifiers[auto.backend] = auto
    rows = []
    for batch in config.inference_batches:
        images = data.test_images[torch.arange(batch) % len(data.test_images)]  # uint8, as a user's arrive
        for name, clf in classifiers.items():
            # One backend at a time: each runtime's idle threads spin for a while after a
            # call, and interleaving would charge that to the other backend.
            calls = max(1, config.inference_images // batch)  # enough work per round to time
            predict = {name: lambda n_steps=None, c=clf: [c.predict_proba(images) for _ in range(calls)]}
            rate = _interleaved_rates(predict, batch * calls, config, device)[name]
            rows.append({"backend": name, "batch": batch, "images_per_second": rate,
                         "default": name == auto.backend})
    latency = {}
    one = data.test_images[0]
    for name, classifier in classifiers.items():
        for _ in range(20):
            classifier.predict_proba(one)
        timings = []
        for _ in range(config.latency_calls):
            start = time.perf_counter()
            classifier.predict_proba(one)
            timings.append((time.perf_counter() - start) * 1e3)
        quantiles = statistics.quantiles(timings, n=100)
        latency[name] = {"p50": quantiles[49], "p99": quantiles[98], "default": name == auto.backend}
    return rows, latency


def _quantized(data: FashionMNIST, config: BenchConfig) -> list[dict]:
    """fp32 and int8 ONNX files of one model: images/s at batch 256 (interleaved rounds), bytes,
    and with a trained run, test accuracy and agreement on the test set."""
    import numpy as np

    from .deploy.export import calibration_images, predictions, quantize_int8
    from .deploy.onnx import onnx_bytes, ort_session
    from .evaluation.saved import load_run_model

    model = load_run_model(config.run_dir)[0] if config.run_dir else create_model("notebook").eval()
    exact = onnx_bytes(model)
    files = {"fp32": exact, "int8": quantize_int8(exact, calibration_images(data)).SerializeToString()}
    sessions = {name: ort_session(payload) for name, payload in files.items()}
    batch = (data.test_images[:256].numpy()[:, None] / np.float32(255)).astype(np.float32)
    calls = max(1, config.inference_images // len(batch))
    contenders = {name: lambda n_steps=None, s=session: [s.run(None, {"images": batch}) for _ in range(calls)]
                  for name, session in sessions.items()}
    rates = _interleaved_rates(contenders, len(batch) * calls, config, torch.device("cpu"))
    labels = data.test_labels.numpy()
    predicted = {name: predictions(session, data.test_images.numpy()) for name, session in sessions.items()}
    return [{"model": name, "images_per_second": rates[name], "bytes": len(files[name]),
             "test_accuracy": float((predicted[name] == labels).mean()) if config.run_dir else None,
             "agreement_with_fp32": float((predicted[name] == predicted["fp32"]).mean())} for name in files]


def run_benchmark(config: BenchConfig | None = None, log=lambda line: None) -> BenchResult:
    config = config or BenchConfig()
    device = resolve_device(config.device)
    data = load_dataset(config.data_dir)
    notebook = create_model("notebook")
    source = {"release": data.source.release, "directory": data.source.directory,
              "content_sha256": data.source.content_sha256}
    native = native_bf16(device)
    precisions = [p for p in config.precisions if p != "bf16" or native]
    result = BenchResult(environment=environment(device), data=source, gemm_gflops=gemm_gflops(device),
                         gemm_gflops_bf16=gemm_gflops(device, dtype=torch.bfloat16) if native else None,
                         train_flops_per_image=training_flops(notebook),
                         forward_flops_per_image=sum(layer_flops(notebook)),
                         executed_train_flops_per_image=executed_training_flops(notebook_step(device)))
    log(f"GEMM: fp32 {result.gemm_gflops:.0f} GFLOP/s, bf16 {_bf16_gemm(result)}")
    # The ceiling in images/s counts the notebook network's FLOPs, the usual count.
    # fmnist computes fewer (it skips conv outputs the pooling discards, and on the CPU
    # backpropagates through the pooling winners only), so its arithmetic rate is reported
    # separately: hardware use, executed FLOP/s over the GEMM rate.
    ceiling = result.gemm_gflops * 1e9 / result.train_flops_per_image

    for batch in config.batch_sizes:
        contenders = {f"fmnist {p}": fmnist_trainer(data, batch, config.train_steps, device, p)
                      for p in precisions}
        contenders["textbook fp32"] = textbook_trainer(data, batch, config.train_steps, device)
        rates = _interleaved_rates(contenders, batch * config.train_steps, config, device)
        baseline = rates["textbook fp32"]
        for name, rate in rates.items():
            executed = result.train_flops_per_image if name.startswith("textbook") else \
                result.executed_train_flops_per_image
            result.training.append({
                "loop": name, "batch": batch, "images_per_second": rate,
                "vs_textbook": rate / baseline, "fraction_of_gemm_ceiling": rate / ceiling,
                "executed_flops_per_image": executed, "hardware_use": rate * executed / (result.gemm_gflops * 1e9),
            })
        log(f"training, batch {batch}: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items()))

    result.inference, result.latency_ms = _inference(data, config, device)
    log("inference: " + ", ".join(f"{r['backend']} batch {r['batch']} {r['images_per_second']:,.0f} img/s"
                                  for r in result.inference))
    result.quantized = _quantized(data, config)
    log("onnx: " + ", ".join(f"{r['model']} {r['images_per_second']:,.0f} img/s" for r in result.quantized))
    result.presets = _presets(data, config, device, result)
    log("presets: " + ", ".join(f"{r['preset']} {r['images_per_second']:,.0f} img/s" for r in result.presets))
    try:
        for batch in config.batch_sizes:
            rate = _interleaved_rates({"keras": keras_trainer(data, batch, config.train_steps)},
                                      batch * config.train_steps, config, device)["keras"]
            result.keras.append({"batch": batch, "images_per_second": rate})
    except ImportError:
        pass  # TensorFlow is optional: the column is simply absent
    return result


def _bf16_gemm(result: BenchResult) -> str:
    if result.gemm_gflops_bf16 is None:
        return "emulated on this device: not measured, no bf16 rows"
    return f"{result.gemm_gflops_bf16:,.0f} GFLOP/s"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def format_table(result: BenchResult) -> str:
    env = result.environment
    lines = [
        f"machine: {env['processor']}, {env['threads']} threads, device {env['device']}, torch {env['torch']}",
        f"data: {result.data['release']} (training images; test images for inference)",
        f"fp32 GEMM ceiling: {result.gemm_gflops:,.0f} GFLOP/s; notebook CNN: "
        f"{result.forward_flops_per_image / 1e6:.2f} MFLOP/image forward, "
        f"{result.train_flops_per_image / 1e6:.2f} MFLOP/image per training step "
        f"-> ceiling {result.gemm_gflops * 1e9 / result.train_flops_per_image:,.0f} images/s",
        f"fmnist computes {result.executed_train_flops_per_image / 1e6:.2f} MFLOP/image per step "
        "(it skips conv outputs and gradients the pooling discards); "
        "'hardware use' = executed FLOP/s / GEMM rate",
        "",
        f"{'training loop':<16} {'batch':>5} {'images/s':>10} {'vs textbook':>12} {'of ceiling':>11} "
        f"{'hardware use':>13}",
    ]
    for row in result.training:
        lines.append(f"{row['loop']:<16} {row['batch']:>5} {row['images_per_second']:>10,.0f} "
                     f"{row['vs_textbook']:>11.2f}x {100 * row['fraction_of_gemm_ceiling']:>10.0f}% "
                     f"{100 * row['hardware_use']:>12.0f}%")
    for row in result.keras:
        lines.append(f"{'keras fit':<16} {row['batch']:>5} {row['images_per_second']:>10,.0f}")
    if result.presets:
        lines += ["", f"bf16 GEMM ceiling: {_bf16_gemm(result)}",
                  f"{'preset (train)':<16} {'batch':>5} {'images/s':>10} {'MFLOP/image':>12} {'GFLOP/s':>8} "
                  f"{'of fp32 GEMM':>13} {'of bf16 GEMM':>13}  step"]
    for row in result.presets:
        lines.append(f"{row['preset']:<16} {row['batch']:>5} {row['images_per_second']:>10,.0f} "
                     f"{row['executed_flops_per_image'] / 1e6:>12.1f} {row['executed_gflops']:>8.0f} "
                     f"{100 * row['hardware_use']:>12.0f}% {_percent(row['of_bf16_gemm']):>13}  "
                     f"{row['step'].split(':')[0]} {row['precision']}")
    lines += ["", f"{'predict_proba':<16} {'batch':>5} {'images/s':>10}"]
    for row in result.inference:
        label = row["backend"] + (" (default)" if row["default"] else "")
        lines.append(f"{label:<16} {row['batch']:>5} {row['images_per_second']:>10,.0f}")
    for name, latency in result.latency_ms.items():
        lines.append(f"single-image latency, {name}: p50 {latency['p50']:.3f} ms, p99 {latency['p99']:.3f} ms")
    if result.quantized:
        lines += ["", f"{'ONNX Runtime':<16} {'batch':>5} {'images/s':>10} {'file bytes':>11} {'test acc.':>10} "
                      f"{'agrees w/ fp32':>15}"]
    for row in result.quantized:
        accuracy = "untrained" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%"
        lines.append(f"{row['model']:<16} {256:>5} {row['images_per_second']:>10,.0f} {row['bytes']:>11,} "
                     f"{accuracy:>10} {100 * row['agreement_with_fp32']:>14.2f}%")
    return "\n".join(lines)
