"""Contrastive losses for aligning two embedding spaces (CLIP's softmax, SigLIP's sigmoid), aware of repeated contents.

A batch of (image, caption) pairs can hold the same caption for several images (or the same image twice). Treating
those as negatives would push apart exactly what should match, so targets are built from content ids: every pair
sharing the image or the caption is a positive, and the cross-entropy target spreads evenly over the positives.

Data-parallel training gathers the negatives of every process: the ``_global`` variants compute this rank's rows
of the global batch's loss against every rank's embeddings, with gradients equal to one process's on that batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed


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


# ---- data-parallel: every rank's rows against the gallery of all ranks ---------------------------------------
#
# Rank r holds b of the global batch's B = W*b pairs. It gathers every rank's (normalized) embeddings with
# gradients and computes only its own rows of the global logits: its b images against all B captions and its b
# captions against all B images. Its loss L_r is the mean over those rows, so the global loss is mean_r L_r, and
# the single-process gradient is dL/dθ = (1/W) d(sum_r L_r)/dθ. The gather's backward sums the ranks' gradients of
# each gathered slice (``all_gather_with_grad``), so rank k's backward yields d(sum_r L_r)/dθ through its own
# features (plus dL_k/dθ for parameters used directly, such as the temperature, whose sum over k is again the full
# derivative); averaging over ranks (``loop.fit``'s ``average_gradients``, or DDP's all-reduce, which also averages)
# divides by W: exactly the single-process gradient. No loss scaling by W is needed, and none may be added.


def _gathered_rows(img_emb: torch.Tensor, txt_emb: torch.Tensor, img_ids: torch.Tensor | None,
                   txt_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Normalized local embeddings, all ranks' embeddings, and the [b, B] positives of the local rows."""
    img = F.normalize(img_emb.float(), dim=-1)
    txt = F.normalize(txt_emb.float(), dim=-1)
    if img.shape != txt.shape:
        raise ValueError(f"image and text embeddings must have equal shapes, got {img.shape} and {txt.shape}")
    # one collective for both towers: half the latency, and no ordering of two gathers' backwards to agree on
    both = distributed.all_gather_with_grad(torch.cat([img, txt], dim=1))
    all_img, all_txt = both.split(img.shape[1], dim=1)
    offset = distributed.rank() * len(img)
    if img_ids is None and txt_ids is None:
        rows = torch.arange(offset, offset + len(img), device=img.device)
        pos = rows[:, None] == torch.arange(len(all_img), device=img.device)[None, :]
    else:
        if img_ids is None or txt_ids is None or img_ids.shape != txt_ids.shape or img_ids.shape != (len(img),):
            raise ValueError(f"img_ids and txt_ids must both be given, 1-D of length {len(img)}")
        ids = torch.stack([img_ids, txt_ids], dim=1).to(img.device)
        all_ids = distributed.all_gather(ids)
        # the positives of ``contrastive_targets``, only our rows: (a, b) share the image or the caption
        pos = (ids[:, None, 0] == all_ids[None, :, 0]) | (ids[:, None, 1] == all_ids[None, :, 1])
    return img, txt, all_img, all_txt, pos


def symmetric_infonce_global(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``symmetric_infonce`` over the global batch of all ranks; this rank's share, whose mean over ranks is the loss.

    ``img_ids`` / ``txt_ids`` are the local pairs' content ids (as for ``contrastive_targets``), gathered for the
    multi-positive mask; None for both means the identity. Every rank passes the same number of pairs. Without an
    active process group it is ``symmetric_infonce(img, txt, scale, contrastive_targets(img_ids, txt_ids))``; with
    one it gathers (and must be called by every rank), also inside ``fit(distributed=False)``.
    """
    img, txt, all_img, all_txt, pos = _gathered_rows(img_emb, txt_emb, img_ids, txt_ids)
    mask = pos.float()
    # the mask is symmetric in (image, caption) roles, so the local captions' rows against all images use it as is
    i2t = _soft_cross_entropy(logit_scale * img @ all_txt.T, mask)
    t2i = _soft_cross_entropy(logit_scale * txt @ all_img.T, mask)
    return 0.5 * (i2t + t2i)


def sigmoid_loss_global(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sigmoid_loss`` over the global batch of all ranks: this rank's images against every rank's captions.

    Each (image, caption) pair of the global batch is counted once, by the rank holding the image; dividing the
    local sum by the local batch size b makes the mean over ranks ``sum / B``, the single-process loss. Ids and the
    calling rules are those of ``symmetric_infonce_global``.
    """
    img, _, _, all_txt, pos = _gathered_rows(img_emb, txt_emb, img_ids, txt_ids)
    logits = logit_scale * img @ all_txt.T + logit_bias
    signs = 2.0 * pos.to(logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum() / len(img)
