"""Contrastive losses for aligning two embedding spaces (CLIP's softmax, SigLIP's sigmoid), aware of repeated contents.

A batch of (image, caption) pairs can hold the same caption for several images (or the same image twice). Treating
those as negatives would push apart exactly what should match, so targets are built from content ids: every pair
sharing the image or the caption is a positive, and the cross-entropy target spreads evenly over the positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_targets(img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
    """Row-normalized soft targets [B, B]: (a, b) is positive when images a, b or captions a, b have equal content ids.

    The diagonal is always positive, so no row is empty. The mask is symmetric, so the same matrix serves as the
    target of both directions (image->text rows and text->image rows).
    """
    if img_ids.shape != txt_ids.shape or img_ids.dim() != 1:
        raise ValueError(f"img_ids and txt_ids must be 1-D of equal length, got {img_ids.shape} and {txt_ids.shape}")
    pos = (img_ids[:, None] == img_ids[None, :]) | (txt_ids[:, None] == txt_ids[None, :])
    pos = pos.float()
    return pos / pos.sum(dim=1, keepdim=True)


def _soft_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_ij log softmax(logits)_ij with t = the row-normalized positives mask."""
    targets = mask / mask.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def symmetric_infonce(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropy over the batch.

    Embeddings are L2-normalized here; ``logit_scale`` is the (already exponentiated) temperature multiplier.
    ``positives`` is a [B, B] mask (bool, or any non-negative matrix such as ``contrastive_targets``; only where it
    is > 0 matters): each row's target spreads evenly over its positives. None means the identity (standard CLIP).
    """
    img = F.normalize(img_emb.float(), dim=-1)
    txt = F.normalize(txt_emb.float(), dim=-1)
    logits = logit_scale * img @ txt.T
    if positives is None:
        labels = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    # Rebuild the 0/1 mask: a row-normalized matrix transposed would weight positives unevenly in the other direction.
    mask = (positives > 0).to(logits.dtype)
    if mask.shape != logits.shape:
        raise ValueError(f"positives must be [{len(img)}, {len(txt)}], got {tuple(mask.shape)}")
    return 0.5 * (_soft_cross_entropy(logits, mask) + _soft_cross_entropy(logits.T, mask.T))


def sigmoid_loss(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): -1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)).

    Every (image, text) pair of the batch is its own binary problem, z_ij = +1 for a positive and -1 otherwise, so
    no softmax couples the rows; the sum is divided by the batch size, not by |B|^2, as in the paper. Embeddings are
    L2-normalized here; ``logit_scale`` is t (already exponentiated) and ``logit_bias`` b (SigLIP starts at 10 and
    -10, so the many negatives do not swamp the start). ``positives`` is a [B, B] mask as for ``symmetric_infonce``
    (only where it is > 0 matters); None means the identity.
    """
    img = F.normalize(img_emb.float(), dim=-1)
    txt = F.normalize(txt_emb.float(), dim=-1)
    logits = logit_scale * img @ txt.T + logit_bias
    if positives is None:
        positives = torch.eye(len(img), len(txt), device=logits.device)
    if positives.shape != logits.shape:
        raise ValueError(f"positives must be [{len(img)}, {len(txt)}], got {tuple(positives.shape)}")
    signs = 2.0 * (positives > 0).to(logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum() / len(img)
