"""Non-contiguous inputs: every op takes any layout (transposed, strided and
broadcast views) and must give exactly what it gives on contiguous copies."""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def view_of(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``tensor``'s shape in ``layout`` (differentiable w.r.t. ``tensor``):
    ``transposed`` stores the last dim outermost (1-D: as ``strided``), ``strided``
    has stride 2 along every dim, ``expanded`` broadcasts the first entry of dim 0
    over it (so its values differ from ``tensor``'s: compare against its contiguous copy)."""
    if layout == "contiguous" or tensor.ndim == 0:
        return tensor
    if layout == "transposed" and tensor.ndim >= 2:
        return tensor.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout in ("transposed", "strided"):
        return torch.stack([tensor, torch.zeros_like(tensor)], -1)[..., 0]
    if layout == "expanded":
        return tensor.narrow(0, 0, 1).expand(tensor.shape)
    raise ValueError(f"unknown layout {layout!r}")


def assert_layout_free(call, data: torch.Tensor, layouts: dict, others: dict, cotangent=None):
    """``call(data=..., **others)`` on views (``layouts`` maps each argument name, and
    ``"data"``, to a layout) equals the call on their contiguous copies, output and,
    with a ``cotangent``, the gradient w.r.t. ``data``'s storage; exactly."""
    results = []
    for contiguous in (False, True):
        leaf = data.detach().clone().requires_grad_(cotangent is not None)
        args = {name: view_of(value, layouts[name]) for name, value in dict(others, data=leaf).items()}
        if contiguous:
            args = {name: value.contiguous() for name, value in args.items()}
            assert all(value.is_contiguous() for value in args.values())
        out = call(**args)
        grad = None
        if cotangent is not None:
            (grad,) = torch.autograd.grad(out, leaf, cotangent.to(out.dtype))
        results.append((out.detach(), grad))
    (out_view, grad_view), (out_copy, grad_copy) = results
    exactly = dict(rtol=0, atol=0, equal_nan=True)  # layout-free, whatever the values (NaN included)
    torch.testing.assert_close(out_view, out_copy, **exactly, msg="output differs from the one of contiguous inputs")
    if cotangent is not None:
        torch.testing.assert_close(grad_view, grad_copy, **exactly,
                                   msg="gradient differs from the one of contiguous inputs")
