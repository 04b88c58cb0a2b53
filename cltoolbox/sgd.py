"""``PlainSGD``: plain SGD's update without ``torch.optim.SGD``'s per-call machinery (the loop's fast path)."""

from __future__ import annotations

import torch
from torch.optim import optimizer as torch_optimizer


class PlainSGD:
    """``step()`` and ``zero_grad()`` bit-identical to a plain ``torch.optim.SGD``'s (``set_to_none=True``),
    without its per-call Python machinery (profiler span, hook dispatch, grouping by device and dtype).

    At batch size 10 on a small MLP, ``SGD.step`` + ``zero_grad`` cost about 50 us of a ~400 us step. The
    update is the arithmetic of torch's SGD (weight decay ``g + wd * p``; momentum buffer ``b = g`` at the
    first step, then ``b = m * b + g``, kept in ``opt.state`` as torch keeps it; ``p -= lr * g``) with
    ``torch._foreach_*`` ops, which compute per element exactly what torch's per-tensor loop computes (they
    are its foreach path, the default on GPUs). Anything else (nesterov, dampening, maximize, differentiable,
    fused, a tensor learning rate, sparse gradients, registered step hooks) goes to ``opt.step()``.
    """

    def __init__(self, opt: torch.optim.SGD) -> None:
        self.opt = opt

    @staticmethod
    def supports(opt: torch.optim.Optimizer) -> bool:
        return type(opt) is torch.optim.SGD

    def zero_grad(self) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                p.grad = None

    def _plain(self, group: dict) -> bool:
        return not (group.get("nesterov") or group.get("dampening", 0) != 0 or group.get("maximize")
                    or group.get("differentiable") or group.get("fused") or isinstance(group["lr"], torch.Tensor))

    def step(self) -> None:
        opt = self.opt
        if (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _GLOBAL_STEP_HOOKS[0]
                or _GLOBAL_STEP_HOOKS[1] or not all(self._plain(g) for g in opt.param_groups)):
            opt.step()
            return
        updates = []
        for group in opt.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                opt.step()
                return
            updates.append((group, params, grads))
        grad_mode = torch.is_grad_enabled()  # a plain switch: the torch.no_grad decorator costs ~5 us a call
        torch.set_grad_enabled(False)
        try:
            self._update(updates)
        finally:
            torch.set_grad_enabled(grad_mode)

    def _update(self, updates: list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]) -> None:
        opt = self.opt
        for group, params, grads in updates:
            if not params:
                continue
            wd, momentum = group["weight_decay"], group["momentum"]
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if momentum != 0:
                bufs = []
                for p, g in zip(params, grads, strict=True):
                    state = opt.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(momentum).add_(g)
                    bufs.append(buf)
                grads = bufs
            torch._foreach_add_(params, grads, alpha=-group["lr"])


# torch's global optimizer step hooks (register_optimizer_step_pre_hook / _post_hook): PlainSGD defers to
# opt.step() while any is registered
_GLOBAL_STEP_HOOKS = (getattr(torch_optimizer, "_global_optimizer_pre_hooks", {}),
                      getattr(torch_optimizer, "_global_optimizer_post_hooks", {}))
