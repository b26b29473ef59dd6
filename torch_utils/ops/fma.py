"""Fused multiply-add `a*b + c` with broadcasting."""

import torch


def fma(a, b, c):
    """Return `a*b + c`; the inputs broadcast against each other."""
    return _FusedMultiplyAdd.apply(a, b, c)


def _unbroadcast(x, shape):
    """Sum `x` over the dimensions that broadcasting added to a tensor of `shape`."""
    extra = x.ndim - len(shape)
    dims = list(range(extra))
    dims += [extra + i for i, size in enumerate(shape) if size == 1 and x.shape[extra + i] != 1]
    if dims:
        x = x.sum(dims, keepdim=True)
    return x.reshape(shape)


class _FusedMultiplyAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        ctx.save_for_backward(a, b)
        ctx.c_shape = c.shape
        return torch.addcmul(c, a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = grad_b = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_a = _unbroadcast(grad * b, a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = _unbroadcast(grad * a, b.shape)
        if ctx.needs_input_grad[2]:
            grad_c = _unbroadcast(grad, ctx.c_shape)
        return grad_a, grad_b, grad_c
