"""Saliency maps for the classifiers, 2D and 3D: Grad-CAM (ResNet feature maps, ViT tokens) and attention rollout.

Where Grad-CAM reads a model is its :class:`SaliencyTarget`. A MONAI ResNet is read at the output of ``layer4``, as
in the Grad-CAM paper. A ViT classifier is read at the tokens entering its first token-mixing layer (the first block,
or the booster when it sits at ``"embed"``): patch and position embeddings, one token per patch. Not at the final
tokens: the head sees only the pooled CLS token and the final LayerNorm works per token, so the gradient of every
patch token there is exactly zero and the map is flat. Nor at a later block's input: once tokens have mixed, a token
can carry other patches' evidence (measured: a 2-block mean-pooled ViT trained to find a bright square, read at its
last block's input, peaked off the square for every image; read before mixing, on it for every image).

Gradients through a LayerNorm are taken with its normalising scale held constant (the forward values are unchanged).
A LayerNorm ignores its input's scale, so its Jacobian removes the component along the token itself, and evidence a
saturated model already holds (a CLS token that points at the class) reads as useless or even negative. On ViTs
trained to find the square (tests/test_saliency.py), the plain gradient put the peak on it for 0 to 45 % of the images,
depending on the seed; with the scale held, for all of them (the "LN-detach" rule of Ali et al., 2022).

Any other model (a video ViT, say) declares its own target with a ``saliency_target()`` method returning a
:class:`SaliencyTarget`; a declared target also overrides the built-in ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medboost.models.classifier import ViTClassifier

METHODS = ("gradcam", "rollout")


@dataclass(frozen=True)
class SaliencyTarget:
    """The activation Grad-CAM weighs: ``module``'s output, or its first input with ``use_input``. It is a feature map
    ``(1, C, *spatial)`` when ``grid`` is None, else a token sequence ``(1, T, D)`` whose tokens after the first
    ``skip`` (a CLS token) lie on ``grid`` in row-major order."""

    module: nn.Module
    use_input: bool = False
    grid: tuple[int, ...] | None = None
    skip: int = 0


def saliency_target(model: nn.Module) -> SaliencyTarget:
    """The target Grad-CAM uses for ``model``: its own ``saliency_target()`` if it has one, else the built-in one."""
    declared = getattr(model, "saliency_target", None)
    if callable(declared):
        return declared()
    if isinstance(model, ViTClassifier):
        encoder = model.encoder
        first_mixer = encoder.inserts["embed"] if "embed" in encoder.inserts else encoder.blocks[0]
        return SaliencyTarget(first_mixer, use_input=True, grid=encoder.grid, skip=int(encoder.cls_token is not None))
    if isinstance(getattr(model, "layer4", None), nn.Module):
        return SaliencyTarget(model.layer4)  # a ResNet's last stage
    raise TypeError(
        f"no saliency target known for {type(model).__name__}: give the model a saliency_target() method that "
        "returns a medboost.report.saliency.SaliencyTarget"
    )


def saliency_map(
    model: nn.Module, x: torch.Tensor, method: str = "gradcam", target: int | None = None
) -> tuple[torch.Tensor, int]:
    """The ``method`` map (``"gradcam"`` or ``"rollout"``) of one input ``x`` (``1 x C x *spatial``), at the input's
    spatial size, float32 in [0, 1]; and the class it explains (the predicted class unless ``target`` is given)."""
    if method == "gradcam":
        return grad_cam(model, x, target)
    if method == "rollout":
        if target is not None:
            raise ValueError("attention rollout is the same for every class; it takes no target")
        return attention_rollout(model, x)
    raise ValueError(f"saliency method must be one of {', '.join(METHODS)}, got {method!r}")


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, int]:
    """Grad-CAM map for one input ``x`` (``1 x C x *spatial``), upsampled to the input's spatial size, in [0, 1].

    Returns the map and the class it explains (the predicted class unless ``target`` is given). The map is all zeros
    when nothing at the target raises the class score (e.g. an untrained classifier's zero head). The model's
    parameter gradients and train/eval mode are left as they were.
    """
    _check_single(x)
    spec = saliency_target(model)
    saved: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor) -> torch.Tensor:
        if not act.requires_grad:  # a frozen model: differentiate with respect to the activation alone
            act = act.detach().requires_grad_()
        saved["act"] = act
        return act

    if spec.use_input:
        handle = spec.module.register_forward_pre_hook(lambda _m, inputs: (capture(inputs[0]), *inputs[1:]))
    else:
        handle = spec.module.register_forward_hook(lambda _m, _inputs, output: capture(output))
    try:
        with _eval(model), torch.enable_grad(), _layer_norm_scale_held(model):
            logits = model(x)
            if logits.dim() != 2:
                raise TypeError(f"Grad-CAM explains classifiers (logits B x classes), got {tuple(logits.shape)}")
            cls = int(logits[0].argmax()) if target is None else target
            # autograd.grad, not backward(): only the activation's gradient is computed, none lands in .grad.
            (grad,) = torch.autograd.grad(logits[0, cls], saved["act"])
    finally:
        handle.remove()
    act, grad = saved["act"].detach()[0], grad[0]
    if spec.grid is not None:  # tokens (T, D) -> channels first on the grid (D, *grid)
        act, grad = (t[spec.skip :].transpose(0, 1).reshape(-1, *spec.grid) for t in (act, grad))
    weights = grad.mean(dim=tuple(range(1, grad.dim())))  # one weight per channel, averaged over the grid
    cam = (act * weights.view(-1, *[1] * (act.dim() - 1))).sum(0)
    return _to_input_size(F.relu(cam), x), cls


def attention_rollout(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Attention rollout (Abnar & Zuidema, 2020) of a ViT classifier for one input ``x``: the attention of every ViT
    block, averaged over heads, with the residual added as ``0.5 A + 0.5 I``, multiplied through the depth; the map is
    how much the pooled token draws on each patch. Returns it (at the input's size, in [0, 1]) and the predicted class.

    Only the ViT's own attention is traced: the booster's LLM block and the local branch of hybrid blocks are taken
    as not mixing tokens.
    """
    _check_single(x)
    if not isinstance(model, ViTClassifier):
        raise TypeError(f"attention rollout needs a ViT classifier, got {type(model).__name__}")
    encoder = model.encoder
    weights: list[torch.Tensor] = []

    def record(module, inputs, _output):
        output, w = module.forward_with_weights(inputs[0])
        weights.append(w[0])
        return output

    handles = [block.attn.register_forward_hook(record) for block in encoder.blocks]
    try:
        with _eval(model), torch.no_grad():
            cls = int(model(x)[0].argmax())
            pooling = model.pool_weights(encoder(x))[0]  # (T,): what the head's pooled token is made of
    finally:
        for handle in handles:
            handle.remove()
    weights = weights[: len(encoder.blocks)]  # the second forward (pooling weights) recorded the blocks again
    eye = torch.eye(weights[0].shape[-1])
    rollout = eye
    for w in weights:  # rows of 0.5 A + 0.5 I already sum to 1: no renormalisation needed
        rollout = (0.5 * w.mean(0) + 0.5 * eye) @ rollout
    skip = int(encoder.cls_token is not None)
    relevance = pooling @ rollout[:, skip:]  # the CLS row, the mean of all rows, or the sequence-pooling mix
    return _to_input_size(relevance.reshape(encoder.grid), x), cls


@contextmanager
def _layer_norm_scale_held(model: nn.Module) -> Iterator[None]:
    """While the block runs, every last-axis ``nn.LayerNorm`` of ``model`` gives the same output, but its gradient
    treats the normalising scale as a constant (see the module docstring). Other norms (the RMSNorms inside an LLM
    block) keep their plain gradient."""

    def held(module: nn.LayerNorm, inputs, _output):
        centred = inputs[0] - inputs[0].mean(-1, keepdim=True)
        out = centred / (centred.pow(2).mean(-1, keepdim=True) + module.eps).sqrt().detach()
        if module.weight is not None:
            out = out * module.weight
        return out + module.bias if module.bias is not None else out

    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1]
    handles = [m.register_forward_hook(held) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Run the model in eval mode, then restore the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_single(x: torch.Tensor) -> None:
    if x.dim() not in (4, 5) or x.shape[0] != 1:
        raise ValueError(f"saliency maps explain one input (1 x C x H x W or 1 x C x D x H x W), got {tuple(x.shape)}")


def _to_input_size(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A non-negative map on the model's grid -> the input's spatial size, scaled to [0, 1], float32."""
    cam = cam.float()[None, None]
    mode = "bilinear" if cam.dim() == 4 else "trilinear"
    cam = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[0, 0]
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-12)
