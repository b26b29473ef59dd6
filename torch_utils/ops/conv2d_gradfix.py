"""`conv2d` / `conv_transpose2d` with an option to skip weight gradients.

Both match `torch.nn.functional`. Inside `no_weight_gradients()` the backward pass
returns no gradient for the weight (R1 regularization only needs input gradients). The
flag is read when the backward runs, which is how the losses use it, so the custom
autograd op is used whenever the flag could matter: while `enabled` is set (the training
loop sets it) or the flag is already on at forward time. Its backward is built from
differentiable ops, so second-order gradients (through the input gradient) still work.
"""

import contextlib

import torch
import torch.nn.functional as F

enabled = False                    # Use the custom op, so `no_weight_gradients` can act during backward.
weight_gradients_disabled = False  # Set by `no_weight_gradients`.


@contextlib.contextmanager
def no_weight_gradients(disable=True):
    """Within the block, backward passes of these convolutions give the weight no gradient."""
    global weight_gradients_disabled
    old = weight_gradients_disabled
    if disable:
        weight_gradients_disabled = True
    try:
        yield
    finally:
        weight_gradients_disabled = old


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if _use_custom_op(input, weight, padding):
        cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return _ConvOp.apply(input, weight, bias, False, cfg)
    return F.conv2d(input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    if _use_custom_op(input, weight, padding):
        cfg = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                   dilation=dilation)
        return _ConvOp.apply(input, weight, bias, True, cfg)
    return F.conv_transpose2d(input, weight, bias, stride=stride, padding=padding,
                              output_padding=output_padding, groups=groups, dilation=dilation)


def _use_custom_op(input, weight, padding):
    if not (enabled or weight_gradients_disabled) or not torch.is_grad_enabled():
        return False
    if isinstance(padding, str):  # 'same'/'valid': not supported by torch.nn.grad.
        return False
    return input.requires_grad or weight.requires_grad


class _ConvOp(torch.autograd.Function):
    """F.conv2d (or F.conv_transpose2d) whose backward honours `weight_gradients_disabled`."""

    @staticmethod
    def forward(ctx, input, weight, bias, transpose, cfg):
        ctx.save_for_backward(input, weight)
        ctx.transpose = transpose
        ctx.cfg = cfg
        op = F.conv_transpose2d if transpose else F.conv2d
        return op(input, weight, bias, **cfg)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        # The plain-conv view: conv2d(a, weight) = b, where a transposed conv maps b -> a.
        conv = dict(ctx.cfg)
        conv.pop('output_padding', None)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.transpose:
                grad_input = F.conv2d(grad, weight, **conv)
            else:
                grad_input = torch.nn.grad.conv2d_input(input.shape, weight, grad, **conv)
        if ctx.needs_input_grad[1] and not weight_gradients_disabled:
            if ctx.transpose:
                grad_weight = torch.nn.grad.conv2d_weight(grad, weight.shape, input, **conv)
            else:
                grad_weight = torch.nn.grad.conv2d_weight(input, weight.shape, grad, **conv)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum([0, 2, 3])
        return grad_input, grad_weight, grad_bias, None, None
