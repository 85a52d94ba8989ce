"""REFINE's IBPP module (Eq. 2-6) and occlusion head on random tensors: shapes and gradient routes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unipan.modeling.heads.ibpp import IBPP
from unipan.modeling.heads.occlusion import OcclusionHead

E, C, T, R = 8, 5, 3, 6  # embedding channels, classes, thing classes, RoI resolution


def make_ibpp(iterations: int, share: bool = False) -> IBPP:
    torch.manual_seed(0)
    return IBPP(
        iterations=iterations,
        share_weights=share,
        feature_channels=E,
        num_classes=C,
        num_things=T,
        mask_num_convs=2,
        mask_conv_dims=8,
        sem_channels=32,
        pooler_resolution=R,
        sampling_ratio=1,
    )


def inputs(
    k: tuple[int, int] = (3, 2),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    f_ins = torch.randn((sum(k), E, R, R), generator=g, requires_grad=True)
    embedding = torch.randn((2, E, 10, 12), generator=g, requires_grad=True)
    sem = torch.randn((2, C, 10, 12), generator=g, requires_grad=True)
    rois = [torch.tensor([[2.0, 3.0, 30.0, 25.0], [10.0, 10.0, 40.0, 38.0], [0.0, 0.0, 20.0, 12.0]])[: k[0]]]
    rois.append(torch.tensor([[5.0, 5.0, 25.0, 35.0], [20.0, 8.0, 44.0, 30.0]])[: k[1]])
    labels = [torch.tensor([0, 2, 1])[: k[0]], torch.tensor([1, 1])[: k[1]]]
    weights = [torch.tensor([0.9, 0.8, 0.5])[: k[0]], torch.tensor([0.7, 0.6])[: k[1]]]
    return f_ins, embedding, sem, rois, labels, weights


def grads(out: torch.Tensor, params: list[torch.Tensor]) -> list[float]:
    got = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else float(g.abs().sum()) for g in got]


@pytest.mark.parametrize("iterations", [1, 3])
def test_shapes(iterations: int) -> None:
    ibpp = make_ibpp(iterations)
    f_ins, embedding, sem, rois, labels, weights = inputs()
    f_sem, steps = ibpp(f_ins, embedding, sem, rois, labels, weights)
    assert f_sem.shape == (5, E, R, R) and len(steps) == iterations
    for step in steps:
        assert step.mask_logits.shape == (5, T, 2 * R, 2 * R) and step.own_logits.shape == (5, 2 * R, 2 * R)
        assert step.mask_features.shape == (5, 8, R, R)
        assert step.flattened.shape == (2, T, 10, 12) and step.sem_logits.shape == (2, C, 10, 12)
        # the canvas of a class without RoIs in an image is empty
        flat = step.flattened.detach()
        assert float(flat[1, 0].abs().sum()) == 0 and float(flat[1, 1].sum()) > 0


def test_gradient_routes_per_iteration() -> None:
    """Nothing is detached: each iteration's semantic output reaches its mask head, the RoI features
    and the previous semantic logits; each mask output reaches the semantic side."""
    ibpp = make_ibpp(2)
    f_ins, embedding, sem, rois, labels, weights = inputs()
    _, steps = ibpp(f_ins, embedding, sem, rois, labels, weights)
    mask1, mask2 = (list(h.parameters()) for h in ibpp.mask_heads)
    sem1, sem2 = (list(h.parameters()) for h in ibpp.sem_heads)
    # semantic output of t=1 <- H_ins^(1) (through ROI-Flatten), f_ins, P^(0), F_sem
    assert all(g > 0 for g in grads(steps[0].sem_logits.sum(), [*mask1, f_ins, sem, embedding]))
    assert grads(steps[0].sem_logits.sum(), [*mask2, *sem2]) == [0.0] * (len(mask2) + len(sem2))
    # mask output of t=1 <- P^(0) (Eq. 3) and F_sem (Eq. 2); of t=2 <- H_sem^(1) (through P^(1))
    assert all(g > 0 for g in grads(steps[0].own_logits.sum(), [sem, embedding]))
    assert all(g > 0 for g in grads(steps[1].own_logits.sum(), [p for p in sem1 if p.dim() > 1]))
    # the flatten weights: the caller's (detached) scores, no gradient needed
    assert not any(w.requires_grad for w in weights)


def test_shared_weights_and_empty_rois() -> None:
    separate, shared = make_ibpp(3), make_ibpp(3, share=True)
    n_sep = sum(p.numel() for p in separate.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_sep == 3 * n_shared
    f_ins, embedding, sem, rois, labels, weights = inputs((0, 0))
    f_sem, steps = shared(f_ins, embedding, sem, rois, labels, weights)
    assert f_sem.shape == (0, E, R, R) and steps[-1].own_logits.shape == (0, 2 * R, 2 * R)
    assert steps[-1].sem_logits.shape == (2, C, 10, 12)
    steps[-1].sem_logits.sum().backward()  # a graph without RoIs still backpropagates
    with pytest.raises(ValueError, match="at least one iteration"):
        make_ibpp(0)


@pytest.mark.parametrize("inputs_", [["mask"], ["mask", "feature"], ["mask", "feature", "label"], ["feature", "label"]])
def test_occlusion_head_inputs(inputs_: list[str]) -> None:
    torch.manual_seed(0)
    head = OcclusionHead(
        inputs=inputs_, feature_channels=E, num_things=T, resolution=R, num_convs=2, conv_channels=8, fc_dim=16
    )
    first = next(m for m in head.convs if isinstance(m, nn.Conv2d))
    assert first.in_channels == 2 * ("mask" in inputs_) + 2 * E * ("feature" in inputs_)
    assert head.fc1.in_features == 8 * (R // 2) ** 2 + 2 * T * ("label" in inputs_)
    feats, masks = torch.randn(4, E, R, R), torch.rand(4, 2 * R, 2 * R)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3]])
    logits = head(feats, masks, torch.tensor([0, 1, 2, 0]), pairs)
    assert logits.shape == (3,) and bool(torch.isfinite(logits).all())
    # the labels matter exactly when they are an input
    other = head(feats, masks, torch.tensor([1, 1, 2, 0]), pairs)
    assert bool((other[:2] != logits[:2]).any()) == ("label" in inputs_)


def test_occlusion_head_errors() -> None:
    with pytest.raises(ValueError, match="need 'mask' or 'feature'"):
        OcclusionHead(inputs=["label"], feature_channels=E, num_things=T)
    with pytest.raises(ValueError, match=r"\['shape'\] unknown"):
        OcclusionHead(inputs=["mask", "shape"], feature_channels=E, num_things=T)
