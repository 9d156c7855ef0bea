"""Training losses over the item catalog (pure tensors).

Every loss takes hidden states at the N real target positions, the item embedding table and the
targets, and returns a scalar. The full-softmax cross-entropy is the default; the three sampled
losses score only the target and M sampled negatives per position, which is much cheaper for large
catalogs.

* ``ce``: full-softmax cross-entropy over all C items (PAD masked).
* ``sampled_softmax``: softmax over the target and M negatives drawn from a proposal q (popularity
  or uniform), with the logQ correction logit - log(M q(item)) (Bengio & Senécal 2008; Yi et al.,
  "Sampling-bias-corrected neural modeling for large corpus item recommendations", RecSys 2019);
  negatives equal to the target are masked.
* ``bce``: binary cross-entropy with M uniformly sampled negatives (the original SASRec loss, Kang &
  McAuley 2018, with M = 1).
* ``gbce``: generalised BCE of gSASRec (Petrov & Macdonald, "gSASRec: Reducing Overconfidence in
  Sequential Recommendation Trained with Negative Sampling", RecSys 2023): the positive probability
  is raised to beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = M / (C - 2), t in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec.constants import PAD_IDX

LOSSES = ("ce", "sampled_softmax", "bce", "gbce")


def full_ce(hidden: Tensor, item_emb: Tensor, targets: Tensor) -> Tensor:
    """Full-softmax cross-entropy.

    Args:
        hidden: (N, D) float hidden states at target positions.
        item_emb: (C, D) float item embeddings (row PAD_IDX never scores).
        targets: (N,) int64 next items in 1..C-1.

    Returns:
        Scalar float mean loss.
    """
    # Scoring against rows 1.. (a contiguous view) leaves PAD out of the softmax exactly as a
    # -inf logit would, without materialising and masking an (N, C) copy; targets shift by one.
    logits = hidden @ item_emb[PAD_IDX + 1 :].t()  # (N, C - 1)
    return F.cross_entropy(logits.float(), targets - (PAD_IDX + 1))


def sample_negatives(
    num_negatives: int, sampling_probs: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Draw M item indices (shared by the batch) from ``sampling_probs``.

    Args:
        num_negatives: M.
        sampling_probs: (C,) float proposal probabilities, 0 at PAD_IDX.

    Returns:
        (M,) int64 item indices, with replacement.
    """
    return torch.multinomial(sampling_probs, num_negatives, replacement=True, generator=generator)


def sampled_softmax(
    hidden: Tensor, item_emb: Tensor, targets: Tensor, negatives: Tensor, log_q: Tensor
) -> Tensor:
    """Sampled softmax with logQ correction.

    Args:
        hidden: (N, D) float; item_emb: (C, D) float; targets: (N,) int64.
        negatives: (M,) int64 shared negatives drawn from q.
        log_q: (C,) float log proposal probabilities log q(item).

    Returns:
        Scalar float mean loss.
    """
    num_negatives = negatives.numel()
    pos = (hidden * item_emb[targets]).sum(-1, keepdim=True)  # (N, 1)
    neg = hidden @ item_emb[negatives].t()  # (N, M)
    correction = log_q + torch.log(torch.tensor(float(num_negatives), device=log_q.device))
    pos = pos - correction[targets].unsqueeze(1)
    neg = neg - correction[negatives].unsqueeze(0)
    is_hit = negatives.unsqueeze(0) == targets.unsqueeze(1)  # (N, M) accidental hits
    neg = neg.masked_fill(is_hit, torch.finfo(neg.dtype).min)
    logits = torch.cat([pos, neg], dim=1).float()  # (N, 1 + M), target in column 0
    return F.cross_entropy(
        logits, torch.zeros(len(targets), dtype=torch.int64, device=logits.device)
    )


def _pos_neg_logits(
    hidden: Tensor, item_emb: Tensor, targets: Tensor, negatives: Tensor
) -> tuple[Tensor, Tensor]:
    pos = (hidden * item_emb[targets]).sum(-1)  # (N,)
    neg = hidden @ item_emb[negatives].t()  # (N, M)
    return pos.float(), neg.float()


def bce(hidden: Tensor, item_emb: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
    """Binary cross-entropy: target labelled 1, each sampled negative 0 (accidental hits ignored).

    Args:
        hidden: (N, D) float; item_emb: (C, D) float; targets: (N,) int64; negatives: (M,) int64.

    Returns:
        Scalar float: mean over positions of (positive term + sum over negatives).
    """
    pos, neg = _pos_neg_logits(hidden, item_emb, targets, negatives)
    is_hit = negatives.unsqueeze(0) == targets.unsqueeze(1)
    neg_loss = F.softplus(neg).masked_fill(is_hit, 0.0)  # -log(1 - sigmoid(neg))
    return (F.softplus(-pos) + neg_loss.sum(1)).mean()


def gbce(
    hidden: Tensor, item_emb: Tensor, targets: Tensor, negatives: Tensor, num_items: int, t: float
) -> Tensor:
    """Generalised BCE (gSASRec).

    The positive term is -log(sigmoid(s)^beta) = beta * softplus(-s), which is what the reference
    implementation's logit transform computes, written here in a numerically stable form.

    Args:
        hidden, item_emb, targets, negatives: as :func:`bce`.
        num_items: catalog size (excluding PAD), for the sampling rate alpha.
        t: calibration parameter in [0, 1]; t = 0 gives plain BCE (beta = 1), t = 1 gives beta = alpha.

    Returns:
        Scalar float loss.
    """
    num_negatives = negatives.numel()
    alpha = num_negatives / max(num_items - 1, 1)
    beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
    pos, neg = _pos_neg_logits(hidden, item_emb, targets, negatives)
    is_hit = negatives.unsqueeze(0) == targets.unsqueeze(1)
    neg_loss = F.softplus(neg).masked_fill(is_hit, 0.0)
    return (beta * F.softplus(-pos) + neg_loss.sum(1)).mean()
