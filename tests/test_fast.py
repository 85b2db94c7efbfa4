"""fmnist.fast: the written-out notebook step computes what autograd computes, and steps aside elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmnist.speed import kernels, make_step
from fmnist.speed.adam import adam_step
from fmnist.speed.notebook import NotebookStep, applies, byte_dropout_mask, kernel_forward, step_by_hand
from fmnist.models.registry import create_model
from fmnist.core.precision import autocast
from fmnist.speed.steps import AutogradStep
from fmnist.training.config import TrainConfig
from fmnist.training.optim import make_optimizer

from .conftest import NEEDS_CUDA

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")


def _notebook(**overrides):
    model = create_model("notebook").to(memory_format=torch.channels_last)  # as NotebookStep keeps it
    return model, make_optimizer(model, TrainConfig(**overrides).resolved())


def _twin_notebooks():
    first, second = create_model("notebook"), create_model("notebook")
    second.load_state_dict(first.state_dict())
    return [m.to(memory_format=torch.channels_last) for m in (first, second)]


@pytest.mark.parametrize("batch,precision", [(32, "fp32"), (33, "fp32"), (1, "fp32"), (32, "bf16")])
def test_step_by_hand_is_autograd_through_the_kernels_bit_for_bit(batch, precision):
    by_autograd, by_hand = _twin_notebooks()
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    torch.manual_seed(1)  # the same dropout masks
    with autocast(x.device, precision):
        logits = kernel_forward(by_autograd, x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    torch.manual_seed(1)
    hand_logits, hand_loss = step_by_hand(by_hand, x, y, precision)
    assert torch.equal(hand_loss, loss) and torch.equal(hand_logits, logits)
    for (name, expected), actual in zip(by_autograd.named_parameters(), by_hand.parameters()):
        assert torch.equal(actual.grad, expected.grad), name
        assert actual.grad.stride() == expected.grad.stride(), name  # the same layout for the optimizer


def test_the_rewritten_step_computes_the_notebook_network():
    # Stock layers through autograd on 28x28 images against the crop, the kernels and the
    # step written out: the same function and gradients up to float rounding (the same masks).
    stock, fast = _twin_notebooks()
    x, y = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 10
    torch.manual_seed(0)
    masks = [byte_dropout_mask(0.25, torch.empty(16, 1600)), byte_dropout_mask(0.5, torch.empty(16, 128))]
    h = stock.pool(F.relu(stock.conv2(stock.pool(F.relu(stock.conv1(x))))))
    logits = stock.fc2(F.relu(stock.fc1(torch.flatten(h, 1) * masks[0])) * masks[1])
    F.cross_entropy(logits, y).backward()
    torch.manual_seed(0)
    fast_logits, _ = step_by_hand(fast, x, y)
    torch.testing.assert_close(fast_logits, logits, atol=1e-5, rtol=1e-5)
    for (name, expected), actual in zip(stock.named_parameters(), fast.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_byte_dropout_masks_keep_the_right_fraction_uniformly(p):
    # Every byte of a 64-bit draw must be uniform (PyTorch's default int64 range leaves the
    # top bit 0, which would drop every eighth value at p = 0.5).
    mask = byte_dropout_mask(p, torch.empty(40_000, 8))
    assert (mask > 0).float().mean(dim=0).tolist() == pytest.approx([1 - p] * 8, abs=0.015)
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - p))))


def test_make_step_picks_the_fast_step_only_where_it_computes_the_same():
    model, optimizer = _notebook()
    assert isinstance(make_step(model, optimizer), NotebookStep)
    assert isinstance(make_step(model, optimizer, precision="bf16"), NotebookStep)
    for kwargs in ({"speedups": False}, {"label_smoothing": 0.1}, {"precision": "fp16"}):
        assert isinstance(make_step(model, optimizer, **kwargs), AutogradStep), kwargs
    resnet = create_model("resnet")
    assert isinstance(make_step(resnet, make_optimizer(resnet, TrainConfig(model="resnet").resolved())),
                      AutogradStep)


def test_applies_refuses_what_autograd_would_do_differently():
    model, optimizer = _notebook()
    assert applies(model, optimizer, "fp32", 0.0)
    handle = model.fc1.register_forward_hook(lambda *args: None)     # hooks must still run
    assert not applies(model, optimizer, "fp32", 0.0)
    handle.remove()
    handle = model.conv2.weight.register_hook(lambda grad: grad)
    assert not applies(model, optimizer, "fp32", 0.0)
    handle.remove()
    model.conv1.requires_grad_(False)                                # frozen layers get no .grad
    assert not applies(model, optimizer, "fp32", 0.0)
    model.conv1.requires_grad_(True)
    model.dropout2.p = 0.3                                           # not a whole multiple of 1/256
    assert not applies(model, optimizer, "fp32", 0.0)
    model.dropout2.p = 0.5
    model.conv1.stride = (2, 2)
    assert not applies(model, optimizer, "fp32", 0.0)
    model.conv1.stride = (1, 1)
    assert applies(model, optimizer, "fp32", 0.0)
    # the step would set gradients this optimizer never clears
    assert not applies(model, torch.optim.Adam(model.fc2.parameters()), "fp32", 0.0)
    model.fc2 = torch.nn.Sequential(torch.nn.Linear(128, 10))       # a layer swapped for another kind
    assert not applies(model, optimizer, "fp32", 0.0)
    model, optimizer = _notebook()
    model.double()
    assert not applies(model, optimizer, "fp32", 0.0)


@pytest.mark.slow
def test_fast_and_autograd_steps_train_the_same_model(dataset):
    # Two epochs of 3,000 real images, SGD as well as Adam: the fast step and stock autograd
    # end close (float rounding differs, so not bit for bit) and both learn.
    from fmnist.data.dataset import to_float
    from fmnist.training.loop import train_one_epoch

    images, labels = to_float(dataset.train_images[:3_000]), dataset.train_labels[:3_000]
    for optimizer_name in ("adam", "sgd"):
        results = []
        for fast in (True, False):
            torch.manual_seed(0)
            model, optimizer = _notebook(optimizer=optimizer_name, lr=1e-3 if optimizer_name == "adam" else 0.05)
            step = make_step(model, optimizer, speedups=fast)
            assert isinstance(step, NotebookStep) == fast
            generator = torch.Generator().manual_seed(0)
            results.append([train_one_epoch(step, images, labels, 32, generator) for _ in range(2)])
        fast_history, autograd_history = results
        assert fast_history[-1][1] > 0.6 and autograd_history[-1][1] > 0.6, optimizer_name  # chance: 0.1
        assert fast_history[-1][1] == pytest.approx(autograd_history[-1][1], abs=0.03), optimizer_name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_adam_step_is_optimizer_step_bit_for_bit(device):
    models = [create_model("notebook").to(device, memory_format=torch.channels_last) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [make_optimizer(model, TrainConfig(lr=0.01).resolved()) for model in models]
    initial = models[0].fc1.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in models[0].parameters()]
        if step == 0:  # reading the state before the first step creates empty entries
            assert all(len(optimizers[1].state[p]) == 0 for p in models[1].parameters())
        if step == 2:  # through a checkpoint round trip, as a resumed run does
            optimizers[1].load_state_dict(optimizers[1].state_dict())
        for model, optimizer, stepper in zip(models, optimizers, (lambda o: o.step(), adam_step)):
            for p, g in zip(model.parameters(), grads):
                p.grad = torch.empty_like(p).copy_(g)  # laid out like the parameter, as autograd's are
            stepper(optimizer)
    for a, b in zip(*(model.parameters() for model in models)):
        assert torch.equal(a, b)
    for a, b in zip(*(optimizer.state_dict()["state"].values() for optimizer in optimizers)):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert not torch.equal(models[1].fc1.weight, initial)  # the steps did move the weights


def test_adam_step_falls_back_to_the_public_step(monkeypatch):
    from fmnist.speed import adam

    model, optimizer = _notebook()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    monkeypatch.setattr(adam, "_FUSED_ADAM", None)  # a PyTorch without the private kernel
    calls = []
    monkeypatch.setattr(optimizer, "step", lambda: calls.append(1))
    adam_step(optimizer)
    assert calls == [1]


@pytest.mark.slow
def test_importing_fmnist_changes_no_process_wide_setting():
    import subprocess
    import sys

    code = "import fmnist, numba; print(numba.config.CPU_FEATURES is None)"
    out = subprocess.run([sys.executable, "-c", "import sys, fmnist; print('numba' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]  # Numba (and its settings) only when a kernel is about to run
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"]


def test_kernels_compile_without_a_disk_cache_where_numba_finds_no_folder(monkeypatch, capsys):
    # A read-only install and no writable home: Numba refuses cache=True (no locator). The
    # kernel is compiled without a disk cache instead, and one line says so, once.
    pytest.importorskip("numba")
    from numba.core import caching

    from fmnist.speed import _numba

    implementation = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # _CacheImpl before Numba 0.61
    monkeypatch.setattr(implementation, "_locator_classes", [])  # Numba's internals: no folder found
    for name, value in (("_announced", False), ("_checked", set()), ("_without_cache", set())):
        monkeypatch.setattr(_numba, name, value, raising=False)

    @_numba.njit()
    def twice(x):
        return 2 * x

    _numba.prepare(twice)
    _numba.prepare(twice)
    assert twice(21) == 42
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no writable cache folder" in err, err


@pytest.mark.slow
def test_flushing_denormals_changes_no_training_result(dataset, monkeypatch):
    # 1,250 steps on real images: long enough for dead units' Adam moments to go denormal
    # (checked below), and the weights come out bit for bit the same with and without the flush.
    import contextlib

    from fmnist.data.dataset import to_float
    from fmnist.speed import _numba, notebook
    from fmnist.training.loop import train_one_epoch

    if not _numba.X86:
        pytest.skip("the flush needs x86")
    images, labels = to_float(dataset.train_images[:20_000]), dataset.train_labels[:20_000]

    def two_epochs():
        torch.manual_seed(0)
        model, optimizer = _notebook()
        step = make_step(model, optimizer)
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            train_one_epoch(step, images, labels, 32, generator)
        moments = torch.cat([state["exp_avg"].flatten() for state in optimizer.state.values()])
        denormal = int(((moments != 0) & (moments.abs() < torch.finfo(torch.float32).tiny)).sum())
        return model.state_dict(), denormal

    flushed, flushed_denormals = two_epochs()
    monkeypatch.setattr(notebook, "denormals_flushed", lambda: contextlib.nullcontext())
    kept, kept_denormals = two_epochs()
    assert flushed_denormals == 0 and kept_denormals > 0  # the case the flush exists for did arise
    assert all(torch.equal(flushed[name], kept[name]) for name in kept)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inference_through_the_kernels_gives_the_stock_logits(layout):
    from fmnist.speed import make_predictor
    from fmnist.speed.inference import predict_logits
    from fmnist.models.wrappers import with_test_time_augmentation

    model = create_model("notebook").to(memory_format=layout).eval()
    images = torch.rand(300, 1, 28, 28)
    assert make_predictor(model) is not model

    def moved(x, dx):  # dx pixels to the right, the emptied column black
        out = torch.zeros_like(x)
        if dx >= 0:
            out[..., dx:] = x[..., :28 - dx]
        else:
            out[..., :dx] = x[..., -dx:]
        return out

    with torch.no_grad():
        expected = model(images)
        flipped = (model(images) + model(images.flip(3))) / 2
        views = [moved(images, dx) for dx in (0, 1, -1)]
        shifted = sum(model(v) + model(v.flip(3)) for v in views) / 6
    torch.testing.assert_close(predict_logits(model, images, batch_size=128), expected, rtol=0, atol=1e-5)
    augmented = with_test_time_augmentation(model, flip=True).eval()
    torch.testing.assert_close(predict_logits(augmented, images), flipped, rtol=0, atol=1e-5)
    augmented = with_test_time_augmentation(model, flip=True, shift=1).eval()
    torch.testing.assert_close(predict_logits(augmented, images), shifted, rtol=0, atol=1e-5)
    torch.testing.assert_close(augmented(images), shifted, rtol=0, atol=1e-5)  # the plain forward agrees


def test_inference_through_the_kernels_steps_aside_where_it_would_differ():
    from fmnist.speed import make_predictor

    model = create_model("notebook")
    assert make_predictor(model) is model                      # training mode: dropout is on
    model.eval()
    handle = model.fc2.register_forward_hook(lambda *args: None)
    assert make_predictor(model) is model                      # hooks must run
    handle.remove()
    assert make_predictor(model) is not model
    resnet = create_model("resnet").eval()
    assert make_predictor(resnet) is resnet
