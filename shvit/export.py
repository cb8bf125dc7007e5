"""ONNX export: ``shvit.export_onnx(model, "shvit_s1.onnx")`` and ``python -m shvit export``.

During ``torch.onnx.export`` every ``shvit_kernels`` op is recorded as its pure-PyTorch reference (see
``shvit_kernels.inline_reference``), so the graph holds only standard ONNX operators (Conv, MatMul, Softmax,
ReduceMean, ...), for the fused and the unfused eval model, with either exporter (TorchScript-based or
dynamo). This module adds a dynamic batch dimension, the choice of exporter, and a check of the file in
ONNX Runtime against the PyTorch model.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Union

import torch
import torch.nn as nn

import shvit_kernels

__all__ = ["add_export_arguments", "cmd_export", "export_onnx", "onnx_max_rel_diff"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _input_size(model: nn.Module, img_size: Optional[int]) -> int:
    if img_size is not None:
        return img_size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    img_size: Optional[int] = None,
    batch_size: int = 2,
    dynamic_batch: bool = True,
    dynamo: bool = False,
    opset: Optional[int] = None,
    verify: Optional[bool] = None,
) -> dict:
    """Write ``model`` (an SHViT, fused or not) in eval mode to ``path`` as ONNX; return a small report.

    The graph is traced at ``batch_size`` x 3 x ``img_size`` x ``img_size`` (default: the model's
    pretrained input size); with ``dynamic_batch`` the batch dimension of input and output is symbolic.
    ``dynamo=True`` uses the torch.export-based exporter, else the TorchScript-based one. ``verify``
    (default: when onnxruntime is installed) runs the file in ONNX Runtime on a batch of another size and
    reports the largest difference relative to the largest |logit| (``max_rel_diff``). The model's own
    train/eval mode is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: 'model' must be an nn.Module, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"export_onnx: 'batch_size' must be >= 1, got {batch_size}")
    size = _input_size(model, img_size)
    in_chans = getattr(model, "in_chans", 3)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.randn(batch_size, in_chans, size, size, device=device)
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=dynamo)
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
        else:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if dynamo:
        kwargs["verbose"] = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), shvit_kernels.inline_reference():
            torch.onnx.export(model, (example,), os.fspath(path), **kwargs)
    finally:
        model.train(was_training)
    report = {"path": os.fspath(path), "exporter": "dynamo" if dynamo else "torchscript", "input_size": size,
              "dynamic_batch": dynamic_batch}
    if verify is None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            verify = False
        else:
            verify = True
    if verify:
        check_batch = batch_size + 1 if dynamic_batch else batch_size
        report["verified_batch"] = check_batch
        report["max_rel_diff"] = onnx_max_rel_diff(model, path, torch.randn(check_batch, in_chans, size, size))
    return report


def onnx_max_rel_diff(model: nn.Module, path: Union[str, os.PathLike], x: torch.Tensor) -> float:
    """max |ONNX Runtime output - model(x)| / max |model(x)| for the eval model (CPU execution provider)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        with torch.no_grad():
            ref = model(x.to(param.device if param is not None else "cpu")).float().cpu().numpy()
    finally:
        model.train(was_training)
    if onnx_out.shape != ref.shape:
        raise RuntimeError(f"ONNX Runtime output has shape {onnx_out.shape}, the model's is {ref.shape}")
    return float(np.abs(onnx_out - ref).max() / max(float(np.abs(ref).max()), 1e-30))


# --------------------------------------------------------------------------------------------------------
# Command line: python -m shvit export
# --------------------------------------------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shvit_s1", help="variant (shvit_s1..s4)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights to export (authors', timm or this project's format); its head sets the classes")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    p.add_argument("--img-size", type=int, default=None, help="default: the paper's resolution for the model")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the traced example (the file takes any batch)")
    p.add_argument("--no-fuse", action="store_true", help="export the unfused eval model (BatchNorms as ONNX ops)")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (default: TorchScript-based)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension at --batch-size")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    p.add_argument("--output", "-o", default=None, help="output file (default: MODEL.onnx)")


def build_export_model(args) -> nn.Module:
    from .checkpoint import _unpack, read_checkpoint
    from .factory import create_model, list_models

    if args.model not in list_models():
        raise ValueError(f"--model: unknown SHViT model {args.model!r}; valid names: {', '.join(list_models())}")
    if args.checkpoint is None:
        return create_model(args.model, num_classes=1000 if args.num_classes is None else args.num_classes)
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint: file not found: {args.checkpoint!r}")
    from .checkpoint import load_checkpoint

    state_dict, meta = _unpack(read_checkpoint(args.checkpoint))
    num_classes = args.num_classes
    if num_classes is None:
        head = state_dict.get("head.l.weight")
        num_classes = int(head.shape[0]) if head is not None else 0
    model = create_model(args.model, num_classes=num_classes, distillation="head_dist.l.weight" in state_dict)
    load_checkpoint(model, args.checkpoint)
    return model


def cmd_export(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = build_export_model(args).eval()
    if not args.no_fuse:
        model = model.fuse()
    output = args.output or f"{args.model}.onnx"
    report = export_onnx(
        model, output, img_size=args.img_size, batch_size=args.batch_size, dynamic_batch=not args.static_batch,
        dynamo=args.dynamo, opset=args.opset, verify=False if args.no_verify else None,
    )
    line = f"wrote {report['path']} ({report['exporter']} exporter, {'fused' if not args.no_fuse else 'unfused'}, " \
           f"{report['input_size']} px, batch {'dynamic' if report['dynamic_batch'] else args.batch_size})"
    if "max_rel_diff" in report:
        line += f"; ONNX Runtime at batch {report['verified_batch']}: max rel. diff {report['max_rel_diff']:.2e}"
    elif not args.no_verify:
        line += "; not verified (onnxruntime is not installed)"
    print(line)
    return 0

