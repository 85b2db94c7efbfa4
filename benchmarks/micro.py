"""The small measurements behind docs/history.md, rerunnable.

    python benchmarks/micro.py                 # about 1.5 minutes on the 2-core dev machine
    python benchmarks/micro.py --skip-compile  # without the torch.compile comparison

  * conv2 (the notebook CNN's second convolution) timed alone, forward and backward, at
    batch 32, as a fraction of the fp32 GEMM rate: how much room the trainer has left;
  * dropout masks: PyTorch's, a float compared with p, and fmnist's byte masks;
  * evaluation throughput in chunks of 256 vs 1024 images (why EVAL_BATCH_SIZE is 256);
  * how long the in-memory ONNX export of the predict path takes;
  * torch.compile against eager for the training step at batch 32 (compile time excluded);
  * one fused Adam step for the notebook CNN (Optimizer.step and fmnist's adam_step), the same with
    dead units' moments denormal, with and without flushing denormals to zero, and the cost
    of alternating a Numba kernel with a PyTorch op (the fused kernel then conv2, against each
    timed alone);
  * which threads do the work of a Numba kernel and of a PyTorch op: the same worker threads,
    because Numba's OpenMP layer binds to the OpenMP runtime PyTorch loaded first;
  * conv2 + max-pool + ReLU backward: the stock layers against the routed kernel;
  * the presets' 2x2 max-pools, forward + backward at batch 128 on the three map sizes of
    their ConvNet, PyTorch's against fmnist.speed.pooling's, bf16 and fp32; and one training
    step of the fast preset's net with either (bf16 autocast).
Each figure is the median of several timed repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fmnist.speed import kernels, make_step, pooling
from fmnist.speed.adam import adam_step
from fmnist.speed.denormals import denormals_flushed
from fmnist.speed.notebook import byte_dropout_mask
from fmnist.bench import gemm_gflops
from fmnist.deploy.onnx import onnx_session
from fmnist.speed.inference import predict_logits
from fmnist.models.registry import create_model
from fmnist.training.config import TrainConfig
from fmnist.training.optim import make_optimizer
from fmnist.training.loop import train_one_epoch


def median_seconds(fn, repeats: int = 7, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv2_alone(batch: int = 32, size: int = 12) -> dict:
    """conv2 as fmnist runs it: on the 12x12 maps that reach the output (13x13 in the notebook)."""
    x = torch.rand(batch, 32, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(64, 32, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(64, requires_grad=True)
    grad = torch.randn(batch, 64, size - 2, size - 2).contiguous(memory_format=torch.channels_last)
    forward_flops = 2 * batch * 64 * (size - 2) ** 2 * 32 * 9
    loops = 50
    fwd = median_seconds(lambda: [F.conv2d(x, weight, bias) for _ in range(loops)]) / loops
    out = F.conv2d(x, weight, bias)
    bwd = median_seconds(lambda: [torch.autograd.grad(out, (x, weight, bias), grad, retain_graph=True)
                                  for _ in range(loops)]) / loops
    return {"forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3,
            "forward_gflops": forward_flops / fwd / 1e9, "backward_gflops": 2 * forward_flops / bwd / 1e9}


def eval_chunks() -> dict:
    model = create_model("notebook").to(memory_format=torch.channels_last).eval()
    images = torch.rand(8192, 1, 28, 28)
    return {chunk: len(images) / median_seconds(lambda c=chunk: predict_logits(model, images, c), repeats=5)
            for chunk in (256, 1024)}


def onnx_export_seconds() -> float:
    model = create_model("notebook").eval()
    return median_seconds(lambda: onnx_session(model), repeats=3, warmup=1)


def compiled_vs_eager(batch: int = 32, steps: int = 100) -> dict:
    images = torch.rand(steps * batch, 1, 28, 28)
    labels = torch.randint(0, 10, (steps * batch,))
    rates = {}
    for name in ("eager", "torch.compile"):
        model = create_model("notebook").to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, TrainConfig().resolved())
        runnable = torch.compile(model) if name == "torch.compile" else model
        step = make_step(runnable, optimizer, speedups=False)  # the stock layers: torch.compile cannot trace Numba
        generator = torch.Generator().manual_seed(0)
        run = lambda: train_one_epoch(step, images, labels, batch, generator)  # noqa: E731
        run()  # warm-up, compilation included
        rates[name] = len(images) / median_seconds(run, repeats=3, warmup=0)
    return rates


def notebook_with_gradients(dead_units: int = 0):
    """The notebook CNN as the fast step holds it, random gradients (zero for ``dead_units`` fc1 units), its Adam."""
    model = create_model("notebook").to(memory_format=torch.channels_last)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    model.fc1.weight.grad[:dead_units] = 0.0
    return model, make_optimizer(model, TrainConfig().resolved())


def adam_step_ms() -> dict:
    """One fused Adam step for the notebook CNN: through Optimizer.step, and as fmnist's trainer calls it."""
    _, optimizer = notebook_with_gradients()
    loops = 100
    return {name: median_seconds(lambda f=f: [f(optimizer) for _ in range(loops)]) / loops * 1e3
            for name, f in (("Optimizer.step", lambda o: o.step()), ("adam_step", adam_step))}


def denormal_adam_ms(dead_units: int = 20) -> dict:
    """fmnist's Adam step when dead fc1 units' first moments have decayed into denormals (about
    20 of 128 units die in a notebook CNN run), with and without fast.denormals.denormals_flushed."""
    model, optimizer = notebook_with_gradients(dead_units)
    optimizer.step()
    moment = optimizer.state[model.fc1.weight]["exp_avg"]
    denormal = 1e-39 * torch.rand_like(moment[:dead_units])
    loops = 20

    def steps():
        for _ in range(loops):
            moment[:dead_units] = denormal  # as they are before the flush
            adam_step(optimizer)
    timings = {}
    for flush in (False, True):
        with denormals_flushed(flush):
            timings["flushed" if flush else "not flushed"] = median_seconds(steps) / loops * 1e3
    return timings


def conv2_backward_ms(batch: int) -> dict:
    """conv2 + max-pool + ReLU backward, stock layers against fmnist's routed kernel, on the
    activations the notebook CNN's first block gives for random images (realistic dead outputs)."""
    model = create_model("notebook").to(memory_format=torch.channels_last)
    with torch.no_grad():
        features = kernels.conv_pool_relu(torch.rand(batch, 1, 26, 26), model.conv1.weight, model.conv1.bias)
    x = features.detach().requires_grad_()
    weight, bias = model.conv2.weight, model.conv2.bias
    stock = F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))
    routed = kernels.conv_pool_relu_routed(x, weight, bias)
    grad = torch.randn(stock.shape)
    loops = 20
    timed = {name: median_seconds(lambda out=out: [torch.autograd.grad(out, (x, weight, bias), grad, retain_graph=True)
                                                   for _ in range(loops)]) / loops * 1e3
             for name, out in (("stock", stock), ("routed", routed))}
    return {**timed, "live": (stock > 0).float().mean().item()}


def max_pool_ms(batch: int = 128) -> dict:
    """Forward + backward of a 2x2 max-pool, PyTorch's and fmnist's, per (dtype, channels, size)."""
    rows = {}
    for dtype in (torch.bfloat16, torch.float32):
        for channels, size in ((32, 28), (64, 14), (128, 7)):
            x = torch.randn(batch, channels, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            grad = torch.randn(batch, channels, size // 2, size // 2).to(dtype).contiguous(
                memory_format=torch.channels_last)
            rows[(str(dtype).removeprefix("torch."), channels, size)] = {
                name: median_seconds(lambda pool=pool: torch.autograd.grad(pool(x), x, grad)) * 1e3
                for name, pool in (("stock", lambda t: F.max_pool2d(t, 2)), ("fmnist", pooling.max_pool_2x2))}
    return rows


def preset_step_ms(name: str = "fast", steps: int = 40, rounds: int = 7) -> dict:
    """One bf16 training step of a preset's net, its max-pools PyTorch's or fmnist's: the two
    alternate, ``rounds`` times ``steps`` steps each, and the medians are kept (this shared
    machine's speed drifts within a minute)."""
    config = TrainConfig(model=name).resolved()
    images, labels = torch.rand(128 * steps, 1, 28, 28), torch.randint(0, 10, (128 * steps,))
    runs = {}
    for kind in ("stock", "fmnist"):
        torch.manual_seed(0)
        model = create_model(name, **config.model_args)
        step = make_step(model, make_optimizer(model, config), precision="bf16", label_smoothing=0.1)
        if kind == "stock":
            pooling.use_stock_max_pools(model)

        def run(step=step):
            with step.epoch():
                for start in range(0, len(images), 128):
                    step(images[start:start + 128], labels[start:start + 128])
        runs[kind] = run
        run()  # warm-up
    times = {kind: [] for kind in runs}
    for _ in range(rounds):
        for kind, run in runs.items():
            start = time.perf_counter()
            run()
            times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t) / steps * 1e3 for kind, t in times.items()}


def dropout_mask_ms(batch: int = 128) -> dict:
    """Dropout on the flattened conv features: PyTorch's, a float per value compared with p,
    and fmnist.speed's byte masks (one random byte per value)."""
    x = torch.rand(batch, 1600)
    loops = 50
    each = {
        "F.dropout": lambda: F.dropout(x, 0.25, True),
        "rand >= p": lambda: x * (torch.rand(x.shape) >= 0.25) * (1 / 0.75),
        "byte mask": lambda: x * byte_dropout_mask(0.25, x),
    }
    return {name: median_seconds(lambda f=f: [f() for _ in range(loops)]) / loops * 1e3 for name, f in each.items()}


def alternation_ms(batch: int = 32) -> dict:
    x = torch.rand(batch, 1, 28, 28)[:, :, :26, :26]
    w1, b1 = torch.randn(32, 1, 3, 3), torch.randn(32)
    h = torch.rand(batch, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    w2 = torch.randn(64, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    loops = 50
    each = {
        "kernel": lambda: kernels.conv_pool_relu(x, w1, b1),
        "conv2": lambda: F.conv2d(h, w2),
        "both": lambda: (kernels.conv_pool_relu(x, w1, b1), F.conv2d(h, w2)),
    }
    return {name: median_seconds(lambda f=f: [f() for _ in range(loops)]) / loops * 1e3 for name, f in each.items()}


def busy_threads(seconds: float = 1.0) -> dict:
    """CPU time (clock ticks) each of the process's threads spent while Numba's fused kernel ran
    in a loop, then while a PyTorch matmul did, read from /proc (Linux only)."""
    import os

    def ticks() -> dict:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            name = "main" if int(tid) == os.getpid() else f"thread {tid}"
            out[name] = int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)
        return out

    x, w, b = torch.rand(256, 1, 26, 26), torch.randn(32, 1, 3, 3), torch.randn(32)
    a = torch.randn(1024, 1024)
    each = {"Numba kernel": lambda: kernels.conv_pool_relu(x, w, b), "PyTorch matmul": lambda: a @ a}
    result = {}
    for name, fn in each.items():
        fn()
        before, end = ticks(), time.perf_counter() + seconds
        while time.perf_counter() < end:
            fn()
        after = ticks()
        result[name] = {who: after[who] - before.get(who, 0) for who in sorted(after)
                        if after[who] > before.get(who, 0)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    gemm = gemm_gflops(torch.device("cpu"))
    conv = conv2_alone()
    print(f"fp32 GEMM: {gemm:.0f} GFLOP/s")
    print(f"conv2 alone, batch 32: forward {conv['forward_ms']:.2f} ms ({conv['forward_gflops']:.0f} GFLOP/s, "
          f"{100 * conv['forward_gflops'] / gemm:.0f}% of GEMM), backward {conv['backward_ms']:.2f} ms "
          f"({conv['backward_gflops']:.0f} GFLOP/s, {100 * conv['backward_gflops'] / gemm:.0f}%)")
    chunks = eval_chunks()
    print("evaluation: " + ", ".join(f"chunks of {c}: {r:,.0f} images/s" for c, r in chunks.items()))
    print(f"ONNX export + session + parity check: {onnx_export_seconds():.2f} s")
    adam = adam_step_ms()
    print("one fused Adam step (225k parameters): " + ", ".join(f"{k} {v:.3f} ms" for k, v in adam.items()))
    denormal = denormal_adam_ms()
    print("adam_step with 20 dead fc1 units' moments denormal: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in denormal.items()))
    for batch in (32, 128):
        backward = conv2_backward_ms(batch)
        print(f"conv2 + pool + ReLU backward, batch {batch}: stock {backward['stock']:.3f} ms, routed "
              f"{backward['routed']:.3f} ms ({100 * backward['live']:.0f}% of pooled outputs live)")
    for (dtype, channels, size), ms in max_pool_ms().items():
        print(f"2x2 max-pool fwd + bwd, batch 128, {dtype} {channels}x{size}x{size}: stock {ms['stock']:.3f} ms, "
              f"fmnist {ms['fmnist']:.3f} ms")
    step = preset_step_ms()
    print(f"fast preset's bf16 step, batch 128: stock pools {step['stock']:.1f} ms, fmnist's {step['fmnist']:.1f} ms "
          f"({step['stock'] / step['fmnist']:.2f}x)")
    masks = dropout_mask_ms()
    print("dropout on 128 x 1600 features: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in masks.items()))
    switch = alternation_ms()
    print(f"fused kernel {switch['kernel']:.3f} ms, conv2 {switch['conv2']:.3f} ms, alternating "
          f"{switch['both']:.3f} ms: {switch['both'] - switch['kernel'] - switch['conv2']:+.3f} ms per pair")
    if sys.platform == "linux":
        for name, busy in busy_threads().items():
            print(f"CPU ticks by thread while the {name} ran: " + ", ".join(f"{who} {t}" for who, t in busy.items()))
    if not args.skip_compile:
        rates = compiled_vs_eager()
        print("training step, batch 32, stock layers: "
              + ", ".join(f"{name} {rate:,.0f} images/s" for name, rate in rates.items()))


if __name__ == "__main__":
    main()
