"""Patch-embedding family: SHViT's stem, four 3x3 stride-2 convs (BN folded, with bias), ReLU after the first three:
``conv4(relu(conv3(relu(conv2(relu(conv1(x)))))))``, a 16x downsampling.

* ``shvit::patch_embed`` (inference): one op, so a kernel can run all four layers on one image while its
  intermediate maps are in cache. Weights keep the conv layout: w_i (C_i, C_{i-1}, 3, 3), b_i (C_i,).
  ``out_channels_last``: the output in channels_last whatever x's layout (the layout the later kernels read), so an
  NCHW image batch is never moved whole: the cpp kernel interleaves each image's planes as it reaches it.
* ``shvit::patch_embed_backward``: its gradients (the reference on every backend).
"""

from __future__ import annotations

import torch

from . import _common
from ..tracing import untraced_check
from ._common import (acc_dtype, call_backward_op, check_activation, check_tensor, conv2d, conv_input_grad,
                      conv_weight_grad, define_op, grads_like_inputs_fake, new_output, register_autograd)

LAYERS = 4


def patch_embed_reference(x, w1, b1, w2, b2, w3, b3, w4, b4, out_channels_last=False):
    for i, (w, b) in enumerate(((w1, b1), (w2, b2), (w3, b3), (w4, b4))):
        x = conv2d(x, w, b, stride=2, padding=1)
        if i < LAYERS - 1:
            x = torch.relu(x)
    return x.contiguous(memory_format=torch.channels_last) if out_channels_last else x


def patch_embed_backward_reference(grad_out, x, w1, b1, w2, b2, w3, b3, w4, b4):
    acc = acc_dtype(x.dtype)
    weights, biases = (w1, w2, w3, w4), (b1, b2, b3, b4)
    layer_inputs = [x]  # recomputed in x's dtype, as the forward made them
    for i in range(LAYERS - 1):
        layer_inputs.append(torch.relu(conv2d(layer_inputs[-1], weights[i], biases[i], stride=2, padding=1)))
    g = grad_out.to(acc)  # the gradient of layer i's conv output, from the last layer down
    grads = []
    for i in reversed(range(LAYERS)):
        a = layer_inputs[i].to(acc)
        grads[:0] = [conv_weight_grad(a, weights[i].shape, g, 2, 1, 1).to(weights[i].dtype),
                     g.sum(dim=(0, 2, 3)).to(biases[i].dtype)]
        g = conv_input_grad(a.shape, weights[i].to(acc), g, 2, 1, 1)
        if i:
            g = g * (layer_inputs[i] > 0)
    return (g.to(x.dtype), *grads)


def output_shape(x, w4):
    h, w = x.shape[2], x.shape[3]
    for _ in range(LAYERS):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return (x.shape[0], w4.shape[0], h, w)


def _requested_layout(args):
    return torch.channels_last if len(args) > 9 and args[9] else None


def _patch_embed_fake(x, w1, b1, w2, b2, w3, b3, w4, b4, out_channels_last=False):
    return new_output(output_shape(x, w4), x.dtype, (x,), x.device, torch.channels_last if out_channels_last else None)


patch_embed_op = define_op(
    "patch_embed",
    "(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor w4, Tensor b4, "
    "bool out_channels_last=False) -> Tensor",
    patch_embed_reference,
    _patch_embed_fake,
    output_layout=_requested_layout,
)
patch_embed_backward_op = define_op(
    "patch_embed_backward",
    "(Tensor grad_out, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor w4, "
    "Tensor b4) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    patch_embed_backward_reference,
    grads_like_inputs_fake,
)


def _patch_embed_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])


def _patch_embed_backward(ctx, grad_out):
    return (*call_backward_op(patch_embed_backward_op, grad_out, *ctx.saved_tensors), None)


register_autograd(patch_embed_op, _patch_embed_backward, _patch_embed_setup)


@untraced_check
def check_patch_embed_args(op, x, params):
    check_activation(op, x)
    c = x.shape[1]
    for i in range(LAYERS):
        w, b = params[2 * i], params[2 * i + 1]
        check_tensor(op, f"w{i + 1}", w, ndim=4, like=x, same_dtype=True, what=f"(C_out, C_in={c}, 3, 3)")
        check_tensor(op, f"w{i + 1}", w, shape=(w.shape[0], c, 3, 3), what=f"(C_out, C_in={c}, 3, 3)")
        check_tensor(op, f"b{i + 1}", b, shape=(w.shape[0],), like=x)
        c = w.shape[0]


def patch_embed(x, w1, b1, w2, b2, w3, b3, w4, b4, out_channels_last: bool = False) -> torch.Tensor:
    """SHViT's stem with BN folded: four 3x3 stride-2 padding-1 convs with bias, ReLU after the first three.

    The output follows x's layout, or is channels_last whatever x's when ``out_channels_last``.
    """
    if not isinstance(out_channels_last, bool):
        raise TypeError(f"shvit_kernels.patch_embed: 'out_channels_last' must be a bool, got "
                        f"{type(out_channels_last).__name__}")
    given = (x, w1, b1, w2, b2, w3, b3, w4, b4, out_channels_last)
    result = _common.remembered_call(patch_embed_op, given)
    if result is not _common.MISS:
        return result
    x, w1, w2, w3, w4 = _common.cast_for_autocast(x, w1, w2, w3, w4)
    params = (w1, b1, w2, b2, w3, b3, w4, b4)
    check_patch_embed_args("shvit_kernels.patch_embed", x, params)
    params = tuple(p.to(x.dtype) if i % 2 else p for i, p in enumerate(params))
    return _common.call_op(patch_embed_op, x, *params, out_channels_last, given=given)
