"""Where a preset's training step spends its time, against the machine's GEMM rate.

    python benchmarks/preset_step.py fast          # about 30 s on a 2-core CPU
    python benchmarks/preset_step.py best-cpu --steps 40

Builds the step as ``fmnist train`` does (fmnist.speed.make_step, channels-last, the recipe's
precision resolved for this CPU, batch 128 of random images: the time does not depend on
the pixels), then prints:

  * images/s of the whole step, and PyTorch's profiler grouped by operator and shapes: each
    convolution's forward and backward milliseconds and GFLOP/s, and what is not convolution;
  * each convolution of the net timed alone, forward + backward, by oneDNN and written as
    nine shifted slices and one GEMM (im2col), against the GEMM rate ``fmnist bench`` measures;
  * the step with the 3x3 convolutions' weight gradient on the smallest maps computed as a
    forward convolution (fmnist.speed.convolution, which ``make_step`` uses on CPUs with AMX)
    against oneDNN's own, on any CPU, interleaved round by round;
  * for a net with a whitening layer (``fast``), its step with the layer as one convolution of
    the stacked filters (as it is) against its two halves' outputs concatenated (as it was),
    interleaved round by round.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fmnist.bench import gemm_gflops
from fmnist.core.machine import cpu_name
from fmnist.core.precision import resolve_precision
from fmnist.models.convnet import PatchWhitening
from fmnist.models.registry import create_model, model_entry
from fmnist.speed import make_step
from fmnist.speed.convolution import use_fast_convolutions, use_stock_convolutions

BATCH = 128


def _timed(call, repeats: int) -> float:
    """Seconds per call, after a warm-up."""
    for _ in range(5):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def step_profile(name: str, steps: int) -> tuple[str, list]:
    """(precision, the net's conv layers with their input sizes) after printing the step's profile."""
    recipe = model_entry(name).recipe
    model = create_model(name)
    precision = resolve_precision(recipe.precision, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = make_step(model, optimizer, precision=precision, label_smoothing=recipe.label_smoothing)
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    convs = []
    hooks = [m.register_forward_hook(lambda m, i, o: convs.append((m, tuple(i[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with step.epoch():
        step(x, y)
        for hook in hooks:
            hook.remove()
        seconds = _timed(lambda: step(x, y), steps)
        print(f"{name}: {BATCH / seconds:,.0f} images/s, {seconds * 1e3:.1f} ms a step ({precision})")
        from torch.profiler import profile

        with profile(record_shapes=True) as recorded:
            for _ in range(steps):
                step(x, y)
    rows = recorded.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    conv = sum(r.self_cpu_time_total for r in rows if r.key in ("aten::mkldnn_convolution", "aten::convolution_backward"))
    print(f"convolutions: {conv / total:.0%} of the step's operator time; the rest, by operator:")
    others = sorted((r for r in rows if "convolution" not in r.key), key=lambda r: -r.self_cpu_time_total)[:8]
    for r in others:
        print(f"  {r.key:<36} {r.self_cpu_time_total / steps / 1e3:6.2f} ms a step")
    return precision, convs


def conv_against_gemm(convs: list, precision: str, repeats: int) -> None:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rate = gemm_gflops(torch.device("cpu"), dtype=dtype)
    print(f"\n{dtype} GEMM: {rate:.0f} GFLOP/s; each convolution alone, forward + backward, batch {BATCH}:")
    for module, (n, c, h, w) in convs:
        k = module.out_channels
        x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = torch.randn(k, c, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(n, k, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x_nhwc = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
        matrix = weight.detach().permute(0, 2, 3, 1).reshape(k, 9 * c).contiguous().requires_grad_()
        grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, k).contiguous()

        def onednn():
            F.conv2d(x, weight, padding=1).backward(grad)

        def im2col():
            padded = F.pad(x_nhwc, (0, 0, 1, 1, 1, 1))
            columns = torch.cat([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], 3)
            (columns.reshape(-1, 9 * c) @ matrix.t()).backward(grad_rows)

        gflop = 3 * 2 * n * h * w * k * c * 9 / 1e9  # forward, input gradient, weight gradient
        a, b = _timed(onednn, repeats), _timed(im2col, repeats)
        print(f"  {c:>3} -> {k:<3} at {h}x{w}: oneDNN {a * 1e3:5.2f} ms ({gflop / a:4.0f} GFLOP/s, "
              f"{gflop / a / rate:4.0%} of GEMM), im2col + GEMM {b * 1e3:5.2f} ms ({a / b:.2f}x oneDNN's speed)")


def _print_interleaved(title: str, rates: dict, rounds: int, steps: int) -> None:
    import statistics

    (first, one), (second, two) = rates.items()
    print(f"\n{title}, {rounds} interleaved rounds of {steps} steps: {first} {statistics.median(one):,.0f} "
          f"images/s, {second} {statistics.median(two):,.0f}; median ratio "
          f"{statistics.median(a / b for a, b in zip(one, two)):.3f}x")


def _preset_step(name: str):
    """The preset's step as ``fmnist train`` builds it, from seeded weights."""
    recipe = model_entry(name).recipe
    torch.manual_seed(0)
    model = create_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    return make_step(model, optimizer, precision=resolve_precision(recipe.precision, torch.device("cpu")),
                     label_smoothing=recipe.label_smoothing)


def _interleaved(steps_of: dict, steps: int, rounds: int, before=lambda version: None) -> dict:
    """images/s of each version's step, the versions taking turns round by round (the shared
    VM's speed drifts within a minute); ``before(version)`` runs before each turn."""
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    rates = {version: [] for version in steps_of}
    for _ in range(rounds):
        for version, step in steps_of.items():
            before(version)
            with step.epoch():
                rates[version].append(BATCH / _timed(lambda: step(x, y), steps))
    return rates


def small_map_rewrite_against_stock(name: str, steps: int, rounds: int = 8) -> None:
    steps_of = {}
    for version, switch in (("rewritten", use_fast_convolutions), ("oneDNN's", use_stock_convolutions)):
        steps_of[version] = _preset_step(name)
        switch(steps_of[version].model)  # whatever make_step chose on this CPU
    rates = _interleaved(steps_of, steps, rounds)
    _print_interleaved("weight gradient of the 3x3 convolutions on the smallest maps", rates, rounds, steps)


def whitening_as_one_against_two(name: str, steps: int, rounds: int = 6) -> None:
    def apart(layer, x):  # the layer as it was: two convolutions, their outputs concatenated
        return torch.cat([layer.whitening(x), layer.learned(x)], 1)

    stacked = PatchWhitening.forward
    steps_of = {version: _preset_step(name) for version in ("one convolution", "two, concatenated")}

    def use(version):
        PatchWhitening.forward = stacked if version == "one convolution" else apart
    try:
        rates = _interleaved(steps_of, steps, rounds, before=use)
    finally:
        PatchWhitening.forward = stacked
    _print_interleaved("whitening layer", rates, rounds, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", default="fast")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (at least 1)")
    args = parser.parse_args()
    from fmnist.models.registry import list_models

    if args.preset not in list_models():
        parser.error(f"unknown preset {args.preset!r}; one of {', '.join(list_models())}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    precision, convs = step_profile(args.preset, args.steps)
    conv_against_gemm([(m, s) for m, s in convs if s[1] > 1], precision, args.steps)
    small_map_rewrite_against_stock(args.preset, args.steps)
    if any(isinstance(m, PatchWhitening) for m in create_model(args.preset).modules()):
        whitening_as_one_against_two(args.preset, args.steps)


if __name__ == "__main__":
    main()
