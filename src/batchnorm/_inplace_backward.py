r"""The backward of in-place activated batch norm from its output (:mod:`batchnorm.inplace`).

On the kernels when every :math:`\gamma` inverts and nothing was saved
(:func:`batchnorm._stages.inplace_backward`, one call); otherwise in float64 torch ops, chunk
by chunk, with the saved :math:`\hat{x}` of the channels and elements that do not invert.
"""

from __future__ import annotations

import torch

from . import _stages
from ._stages import broadcast_shape, reduce_dims
from .activations import Activation
from .routing import choose

__all__ = ["affine", "backward", "chunks"]

# Values per chunk of the float64 passes (forward fallbacks, backward): 8 MiB temporaries.
_CHUNK_VALUES = 1 << 20


def affine(weight, bias, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\gamma` and :math:`\\beta` as float64 ``(C,)`` CPU tensors (1 and 0 if absent)."""
    gamma = torch.ones(channels, dtype=torch.float64) if weight is None else weight.detach()
    beta = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.detach()
    return gamma.to(device="cpu", dtype=torch.float64), beta.to(device="cpu", dtype=torch.float64)


def chunks(n: int, per_sample: int):
    """``(start, stop)`` ranges of samples holding at most ``_CHUNK_VALUES`` values (or one)."""
    step = max(1, _CHUNK_VALUES // max(1, per_sample))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def backward(dy, saved, spec: Activation, param, training: bool, need):
    r"""``(dx, dweight, dbias)`` from the output (module docstring), in float64 chunks.

    ``saved``: the output ``y``, ``weight``, ``bias``, ``invstd`` and the four fallback parts
    (:func:`_save_fallback`); ``need``: which of the three gradients autograd asks for.

    Two passes over the batch when training needs ``dx``: the sums :math:`\sum\delta_z` and
    :math:`\sum\delta_z\hat{x}` first, then ``dx`` (whose every value needs both); each pass
    recomputes :math:`z`, :math:`\hat{x}` and :math:`\delta_z` per chunk rather than keeping
    them for the whole batch.
    """
    y, weight, bias, invstd, channel_index, channel_x_hat, element_index, element_x_hat = saved
    if channel_index is None and element_index is None and choose(y, "stage") == "parallel":
        return _backward_on_kernels(dy, y, weight, bias, invstd, spec, param, training, need)
    channels = y.shape[1]
    count = y.numel() // channels
    per_sample = y[0].numel()
    shape, dims = broadcast_shape(y), reduce_dims(y)
    gamma, beta = affine(weight, bias, channels)
    # Unrecoverable channels divide by 1 here; their x_hat is replaced by the saved slice.
    divisor = gamma.clone()
    if channel_index is not None:
        divisor[channel_index] = 1.0
    beta_b, divisor_b = beta.reshape(shape), divisor.reshape(shape)
    need_dx = need[0]
    need_dw = need[1] and weight is not None
    need_db = need[2] and bias is not None
    need_x_hat = need_dw or (training and need_dx)

    def chunk(start, stop):
        # Every op out of place: for float64, y_c and the gradient's chunk are the saved
        # output's and the caller's memory, not copies.
        y_c = y[start:stop].to(torch.float64)
        dz = _through_activation(spec, dy[start:stop].to(torch.float64), y_c, param)
        if not need_x_hat:
            return dz, None
        x_hat = (spec.inverse(y_c, param) - beta_b) / divisor_b
        if channel_index is not None:
            x_hat.index_copy_(1, channel_index, channel_x_hat[start:stop].to(torch.float64))
        if element_index is not None:
            low, high = start * per_sample, stop * per_sample
            bounds = torch.searchsorted(element_index, torch.tensor([low, high]))
            first, last = bounds.tolist()
            if last > first:
                saved = torch.zeros(x_hat.numel(), dtype=torch.bool)
                saved[element_index[first:last] - low] = True
                # Boolean indexing is row-major, as the indices and values were saved.
                x_hat[saved.view(x_hat.shape)] = element_x_hat[first:last].to(torch.float64)
        return dz, x_hat

    sum_dz = torch.zeros(channels, dtype=torch.float64)
    sum_dz_x_hat = torch.zeros(channels, dtype=torch.float64)
    if need_dw or need_db or (training and need_dx):
        for start, stop in chunks(y.shape[0], per_sample):
            dz, x_hat = chunk(start, stop)
            sum_dz += dz.sum(dim=dims)
            if x_hat is not None:
                sum_dz_x_hat += (dz * x_hat).sum(dim=dims)
    dx = None
    if need_dx:
        dx = torch.empty_like(y)
        scale = (gamma * invstd).reshape(shape)
        mean_dz = (sum_dz / count).reshape(shape)
        mean_dz_x_hat = (sum_dz_x_hat / count).reshape(shape)
        for start, stop in chunks(y.shape[0], per_sample):
            dz, x_hat = chunk(start, stop)
            if training:
                dz = dz - mean_dz - x_hat * mean_dz_x_hat
            dx[start:stop] = dz * scale
    dw = sum_dz_x_hat.to(weight.dtype) if need_dw else None
    db = sum_dz.to(bias.dtype) if need_db else None
    return dx, dw, db


def _backward_on_kernels(dy, y, weight, bias, invstd, spec: Activation, param, training, need):
    r""":func:`_backward` in one kernel call (every :math:`\gamma` invertible, no saved values):
    :func:`batchnorm._stages.inplace_backward`."""
    gamma, beta = affine(weight, bias, y.shape[1])
    k = gamma * invstd
    dx, sum_dz, sum_dz_x_hat = _stages.inplace_backward(
        dy, y, (1.0 / gamma).numpy(), beta.numpy(), k.numpy(), spec.code, param, training,
        need[0],
    )  # fmt: skip
    dw = torch.from_numpy(sum_dz_x_hat).to(weight.dtype) if need[1] and weight is not None else None
    db = torch.from_numpy(sum_dz).to(bias.dtype) if need[2] and bias is not None else None
    return dx, dw, db


def _through_activation(spec: Activation, dy, y, param) -> torch.Tensor:
    """:math:`\\delta_z = \\delta\\,a'(z)` from the output :math:`y` (never the caller's ``dy``).

    torch's own derivatives in terms of the output, as its in-place LeakyReLU and ELU use them:
    :math:`a'(z) = p` where :math:`y \\le 0` for LeakyReLU, :math:`y + \alpha` there for ELU
    (:math:`\alpha e^z`, without the exponential of a recovered :math:`z`); torch's values at
    :math:`z = 0`.
    """
    if spec.name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dy, y, param, True)
    if spec.name == "elu":
        return torch.ops.aten.elu_backward(dy, param, 1, 1, True, y)
    return dy.clone()
