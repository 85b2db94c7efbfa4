"""``optimizer.step()`` for a fused Adam, minus the Python around its kernel.

At batch 32 on the CPU, ``Adam.step`` spends about as long on hooks, per-group bookkeeping
and regrouping tensors by device and dtype as in its fused kernel (docs/history.md).
Once every parameter has its state, ``adam_step`` calls the same kernel with the same
arguments: the same update, bit for bit (tested), and the same state, so checkpoints and
``optimizer.state_dict()`` are unchanged. Anything else (the first step, options this does
not handle, hooks, a PyTorch without these private functions) goes through ``optimizer.step()``.
"""

from __future__ import annotations

import torch
import torch.optim.optimizer as _optimizer_module

_FUSED_ADAM = getattr(torch, "_fused_adam_", None)  # private: may move in a PyTorch release
_GLOBAL_HOOKS = [getattr(_optimizer_module, name, None)
                 for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")]


def _global_hooks_unknown_or_set() -> bool:
    return any(hooks is None or len(hooks) for hooks in _GLOBAL_HOOKS)


def _only_the_kernel_is_needed(optimizer: torch.optim.Optimizer, states: list[dict]) -> bool:
    group = optimizer.param_groups[0]
    return (type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1 and _FUSED_ADAM is not None
            and group["fused"] and not (group["amsgrad"] or group["maximize"] or group["capturable"]
                                        or group["differentiable"] or group.get("decoupled_weight_decay"))
            and getattr(optimizer, "grad_scale", None) is None
            and not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)
            and not _global_hooks_unknown_or_set()
            and all("step" in state for state in states) and all(p.grad is not None for p in group["params"]))


@torch.no_grad()
def adam_step(optimizer: torch.optim.Optimizer) -> None:
    group = optimizer.param_groups[0]
    params = group["params"]
    states = [optimizer.state.get(p, {}) for p in params]  # .get: the state is a defaultdict
    if not _only_the_kernel_is_needed(optimizer, states):
        optimizer.step()
        return
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    _FUSED_ADAM(params, [p.grad for p in params], [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states], [], steps, lr=group["lr"], beta1=beta1,
                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                maximize=False, grad_scale=None, found_inf=None)
