"""Grad-CAM saliency for the classifiers (ViT tokens or ResNet feature maps), 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medboost.models.classifier import ViTClassifier


def _target_layer(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output Grad-CAM weighs, and whether that output is a token sequence (ViT)."""
    if isinstance(model, ViTClassifier):
        return model.encoder.norm, True  # final tokens, after the booster if there is one
    if hasattr(model, "layer4"):
        return model.layer4, False  # MONAI ResNet's last stage
    raise TypeError(f"no Grad-CAM target known for {type(model).__name__}")


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, int]:
    """Grad-CAM map for one input ``x`` (``1 x C x *spatial``), upsampled to the input's spatial size, in [0, 1].

    Returns the map and the class it explains (the predicted class unless ``target`` is given).
    """
    layer, tokens = _target_layer(model)
    saved: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        saved["act"] = output

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            cls = int(logits[0].argmax()) if target is None else target
            model.zero_grad(set_to_none=True)
            logits[0, cls].backward()
    finally:
        handle.remove()
    act, grad = saved["act"].detach(), saved["act"].grad.detach()
    if tokens:
        vit: ViTClassifier = model
        start = 1 if vit.encoder.cls_token is not None else 0
        weights = grad[0, start:].mean(dim=0)  # one weight per channel
        cam = (act[0, start:] * weights).sum(-1).reshape(vit.encoder.grid)
    else:
        weights = grad[0].mean(dim=tuple(range(1, grad.dim() - 1)))
        cam = (act[0] * weights.view(-1, *[1] * (act.dim() - 2))).sum(0)
    cam = F.relu(cam)[None, None]
    mode = "bilinear" if cam.dim() == 4 else "trilinear"
    cam = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[0, 0]
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-12), cls
