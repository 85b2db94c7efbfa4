"""The model registry and the seed CNN's faithfulness to the notebook."""

from __future__ import annotations

import pytest
import torch

from fmnist.errors import UserError
from fmnist.models import count_parameters, create_model, forward_flops, list_models


def test_seed_model_shapes_and_size():
    model = create_model("seed")
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    # Keras summary of the notebook's CNN: 320 + 18,496 + 204,928 + 1,290 parameters.
    assert count_parameters(model) == 225_034
    # The notebook's network costs 5.26 MFLOP an image; run on the 26x26 pixels that reach the
    # output it costs 2 * (24*24*32*9 + 10*10*64*288 + 1600*128 + 128*10).
    assert forward_flops(_notebook_order(model)) == pytest.approx(5.26e6, rel=0.01)
    assert forward_flops(model) == 4_430_336


def test_only_the_top_left_26x26_pixels_reach_the_output():
    model = create_model("seed").eval()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    (grad,) = torch.autograd.grad(_notebook_order(model)(x).sum(), x)
    assert torch.all(grad[:, :, 26:] == 0) and torch.all(grad[:, :, :, 26:] == 0)
    assert torch.all(grad[:, :, 25, :26].abs().sum(dim=-1) > 0)  # row 25 does reach it


def _notebook_order(model):
    """The notebook's layer order, built from the model's own layers: ReLU before each pool."""
    nn = torch.nn
    return nn.Sequential(model.conv1, nn.ReLU(), nn.MaxPool2d(2), model.conv2, nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), model.dropout1, model.fc1, nn.ReLU(), model.dropout2, model.fc2)


def test_seed_model_layers_follow_the_notebook():
    model = create_model("seed")
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (1, 32, (3, 3))
    assert (model.conv2.in_channels, model.conv2.out_channels, model.conv2.kernel_size) == (32, 64, (3, 3))
    assert (model.fc1.in_features, model.fc1.out_features) == (1600, 128)
    assert (model.fc2.in_features, model.fc2.out_features) == (128, 10)
    assert (model.dropout1.p, model.dropout2.p) == (0.25, 0.5)


def test_the_rewrites_compute_the_notebook_function():
    model = create_model("seed").eval()
    model.fused_kernels = False  # stock layers on both sides (the kernel takes no pixel gradients)
    x = torch.rand(8, 1, 28, 28, requires_grad=True)
    ours, theirs = model(x), _notebook_order(model)(x)
    # Equal up to float rounding: the cropped conv2 may pick another oneDNN algorithm.
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(*(torch.autograd.grad(out.sum(), x)[0] for out in (ours, theirs)),
                               atol=1e-6, rtol=1e-6)


def test_fused_and_cropped_training_step_gives_the_notebook_weight_gradients():
    model = create_model("seed").train()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(16) % 10
    grads = []
    for network in (model, _notebook_order(model)):
        torch.manual_seed(0)  # the same dropout masks on both sides
        loss = torch.nn.functional.cross_entropy(network(x), labels)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_seed_model_refuses_other_image_sizes():
    model = create_model("seed")
    for shape in [(2, 1, 32, 32), (2, 1, 27, 27), (2, 3, 28, 28)]:
        with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
            model(torch.zeros(shape))


def test_keras_initialisation():
    model = create_model("seed")
    assert all(torch.all(m.bias == 0) for m in (model.conv1, model.conv2, model.fc1, model.fc2))
    # Glorot-uniform bound: sqrt(6 / (fan_in + fan_out))
    assert model.fc1.weight.abs().max() <= (6 / (1600 + 128)) ** 0.5


def test_dropout_keeps_the_right_fraction_and_scale():
    from fmnist.models import Dropout

    layer = Dropout(0.25).train()
    out = layer(torch.ones(200_000))
    assert (out > 0).float().mean().item() == pytest.approx(0.75, abs=0.005)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / 0.75)))
    assert torch.equal(layer.eval()(torch.ones(10)), torch.ones(10))


@pytest.mark.parametrize("p", [0.5, 0.25, 0.3])  # 0.3 is not a multiple of 1/256: the float path
def test_dropout_masks_are_uniform_over_positions(p):
    from fmnist.models import Dropout

    # Masks are cut from 64-bit draws, a byte per value: every byte of a draw must be
    # uniform (PyTorch's default int64 range leaves the top bit 0, which would drop every
    # eighth value at p = 0.5).
    kept = Dropout(p).train()(torch.ones(40_000, 8)) > 0
    assert kept.float().mean(dim=0).tolist() == pytest.approx([1 - p] * 8, abs=0.015)
    assert kept.shape == (40_000, 8)


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_dropout_mask_kernel_gives_the_same_mask_as_pytorch_ops(p):
    from fmnist import kernels
    from fmnist.models import Dropout

    if not kernels.available():
        pytest.skip("needs Numba")
    x = torch.rand(33, 1600)
    outputs = []
    for use_kernel in (True, False):
        layer = Dropout(p).train()
        layer.use_kernel = use_kernel
        torch.manual_seed(0)  # the same random bytes
        outputs.append(layer(x))
    assert torch.equal(*outputs)


def test_dropout_edge_rates():
    from fmnist.models import Dropout

    x = torch.rand(4, 16)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_unknown_model():
    assert "seed" in list_models()
    with pytest.raises(UserError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")


def _twin_seed_models():
    first = create_model("seed").to(memory_format=torch.channels_last)
    second = create_model("seed").to(memory_format=torch.channels_last)
    second.load_state_dict(first.state_dict())
    return first, second


@pytest.mark.parametrize("batch,precision", [(32, "fp32"), (33, "fp32"), (1, "fp32"), (32, "bf16")])
def test_step_by_hand_is_autograd_bit_for_bit(batch, precision):
    import torch.nn.functional as F

    from fmnist.runtime import autocast

    by_autograd, by_hand = _twin_seed_models()
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    assert by_hand.can_step_by_hand(x, precision)
    torch.manual_seed(1)  # the same dropout masks
    with autocast(x.device, precision):  # as the trainer runs the forward pass
        logits = by_autograd(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    torch.manual_seed(1)
    hand_logits, hand_loss = by_hand.step_by_hand(x, y, precision)
    assert torch.equal(hand_loss, loss) and torch.equal(hand_logits, logits)
    for (name, expected), actual in zip(by_autograd.named_parameters(), by_hand.parameters()):
        assert torch.equal(actual.grad, expected.grad), name
        assert actual.grad.stride() == expected.grad.stride(), name  # the same layout for the optimizer


def test_step_by_hand_steps_aside_where_autograd_would_do_more():
    x = torch.rand(4, 1, 28, 28)
    model = create_model("seed").to(memory_format=torch.channels_last)  # as the trainer keeps it
    assert model.can_step_by_hand(x, "fp32")
    assert model.can_step_by_hand(x, "bf16")
    assert not model.can_step_by_hand(x, "fp16")
    assert not model.can_step_by_hand(x.double(), "fp32")
    assert not model.can_step_by_hand(torch.rand(4, 1, 32, 32), "fp32")
    handle = model.fc1.register_forward_hook(lambda *args: None)    # hooks must still run
    assert not model.can_step_by_hand(x, "fp32")
    handle.remove()
    handle = model.conv2.weight.register_hook(lambda grad: grad)
    assert not model.can_step_by_hand(x, "fp32")
    handle.remove()
    model.conv1.requires_grad_(False)                               # frozen layers get no .grad
    assert not model.can_step_by_hand(x, "fp32")
    model.conv1.requires_grad_(True)
    model.dropout2.p = 0.3                                          # not a whole multiple of 1/256
    assert not model.can_step_by_hand(x, "fp32")
    model.dropout2.p = 0.5
    model.by_hand = False
    assert not model.can_step_by_hand(x, "fp32")
    model.by_hand = True
    assert model.can_step_by_hand(x, "fp32")
    model.conv2.weight.data = model.conv2.weight.data.contiguous()  # a layout the step would not match
    assert not model.can_step_by_hand(x, "fp32")
    model.conv2.weight.data = model.conv2.weight.data.contiguous(memory_format=torch.channels_last)
    model.conv1.stride = (2, 2)
    assert not model.can_step_by_hand(x, "fp32")
    model.conv1.stride = (1, 1)
    model.fc2 = torch.nn.Sequential(torch.nn.Linear(128, 10))      # a layer swapped for another kind
    assert not model.can_step_by_hand(x, "fp32")
    model = create_model("seed").to(memory_format=torch.channels_last)
    model.dropout1 = torch.nn.Identity()                             # no error, just autograd
    assert not model.can_step_by_hand(x, "fp32")
    model = create_model("seed").to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):                # an outer autocast
        assert not model.can_step_by_hand(x, "fp32")
    with torch.no_grad():                                            # autograd would refuse to train
        assert not model.can_step_by_hand(x, "fp32")
    assert not model.can_step_by_hand(x.clone().requires_grad_(), "fp32")
    assert not model.eval().can_step_by_hand(x, "fp32")
