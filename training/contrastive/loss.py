"""InfoNCE for embedding training: in-batch + cross-device + hard negatives, with duplicate-target masking.

Cross-device convention (VLM2Vec `src/loss.py`, CoMa `src/loss.py`): every rank all-gathers queries,
positives and negatives without gradient, puts its own tensors back into its slot (so gradient flows into local
embeddings only), and computes the *whole* N x N loss. DDP then averages gradients over W ranks, so the loss used for
backward is multiplied by W; the gradient then equals the single-process gradient on the same global batch (tested
in tests/test_train_distributed.py). `gather_with_local_slot` is the only place that talks to torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_local_slot(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather along dim 0 (sizes may differ per rank); the local slot keeps `x` itself (with its grad).

    Returns the gathered tensor and the offset of this rank's rows in it.
    """
    if world_size() == 1:
        return x, 0
    rank, size = dist.get_rank(), world_size()
    n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n_local) for _ in range(size)]
    dist.all_gather(sizes, n_local)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.detach()
    if x.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    buckets = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(buckets, padded.contiguous())
    pieces = [b[:c] for b, c in zip(buckets, counts)]
    pieces[rank] = x
    return torch.cat(pieces), sum(counts[:rank])


@dataclass
class LossOutput:
    """`loss` is what to backpropagate (scaled by W, see module doc); `value` is the per-sample InfoNCE to log."""

    loss: torch.Tensor
    value: torch.Tensor
    accuracy: torch.Tensor  # in-batch top-1 of query -> its positive, over the gathered batch
    num_queries: int
    num_candidates: int


def _duplicate_mask(row_keys: torch.Tensor, col_keys: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """True where column j holds the same content as row i's positive (a false negative), except the label itself."""
    mask = row_keys[:, None] == col_keys[None, :]
    if diagonal:
        mask.fill_diagonal_(False)
    return mask


def info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    positive_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
    query_keys: torch.Tensor | None = None,
    temperature: float = 0.02,
    symmetric: bool = False,
    cross_device: bool = True,
    unique_candidates: bool = False,
    local_negatives: bool = False,
) -> LossOutput:
    """InfoNCE of L2-normalised `queries` (B, H) against all positives and hard negatives of the (gathered) batch.

    Logits of query i: [q_i . t_j / tau for every positive j] + [q_i . h / tau for every hard negative h]. Columns
    whose content key equals row i's positive key (other than i itself) are masked out (duplicate targets, e.g. a
    repeated class label). `symmetric` adds the target -> query direction over positives (for pure cross-modal pairs).
    `unique_candidates` (needs the keys) scores every distinct key once: a key repeated among the columns counts as
    one negative, not one per repeat (Projector Recovery's cached partner bank, where the candidates are a set).
    `local_negatives`: across processes, query i sees only the hard negatives of the rank that holds it (positives
    stay gathered; OmniRetriever's Tuple-InfoNCE). The negatives are still all-gathered so every rank computes the
    whole loss (the convention above), and the other ranks' negative columns are masked per row. One process: no-op.
    """
    if queries.shape != positives.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must match")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if negatives is None:
        negatives = queries.new_zeros((0, queries.shape[1]))
    gather = gather_with_local_slot if cross_device else (lambda t: (t, 0))
    q, _ = gather(queries)
    t, _ = gather(positives)
    h, _ = gather(negatives)
    n = q.shape[0]
    labels = torch.arange(n, device=q.device)
    logits = torch.cat([q @ t.T, q @ h.T], dim=1).float() / temperature
    if positive_keys is not None:
        pk, _ = gather(positive_keys)
        mask = _duplicate_mask(pk, pk, diagonal=True)
        if negative_keys is not None and h.shape[0]:
            nk, _ = gather(negative_keys)
            mask = torch.cat([mask, _duplicate_mask(pk, nk, diagonal=False)], dim=1)
        else:
            mask = torch.cat([mask, mask.new_zeros((n, h.shape[0]))], dim=1)
        if unique_candidates:
            keys = torch.cat([pk, nk]) if negative_keys is not None and h.shape[0] else pk
            same = keys[:, None] == keys[None, :]
            repeat = torch.tril(same, diagonal=-1).any(dim=1)  # column j repeats an earlier column's key
            own = torch.zeros_like(mask)
            own[labels, labels] = True
            mask = mask | (repeat[None, :] & ~own)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    if local_negatives and cross_device and world_size() > 1 and h.shape[0]:
        rank = dist.get_rank()
        row_rank, _ = gather(torch.full((queries.shape[0],), rank, device=q.device, dtype=torch.int64))
        col_rank, _ = gather(torch.full((negatives.shape[0],), rank, device=q.device, dtype=torch.int64))
        other = torch.cat([torch.zeros((n, t.shape[0]), dtype=torch.bool, device=q.device),
                           row_rank[:, None] != col_rank[None, :]], dim=1)
        logits = logits.masked_fill(other, torch.finfo(logits.dtype).min)
    value = F.cross_entropy(logits, labels)
    if symmetric:
        back = (t @ q.T).float() / temperature
        # Row j (target j) ranks the queries: query i is a false negative when its own positive has target j's
        # content (two CIFAR photos of one class name) or when it repeats query j's content.
        back_mask = _duplicate_mask(pk, pk, diagonal=True) if positive_keys is not None else None
        if query_keys is not None:
            qk, _ = gather(query_keys)
            same_query = _duplicate_mask(qk, qk, diagonal=True)
            back_mask = same_query if back_mask is None else back_mask | same_query
        if back_mask is not None:
            back = back.masked_fill(back_mask, torch.finfo(back.dtype).min)
        value = 0.5 * (value + F.cross_entropy(back, labels))
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
    scale = world_size() if cross_device else 1
    return LossOutput(loss=value * scale, value=value.detach(), accuracy=accuracy, num_queries=n,
                      num_candidates=logits.shape[1])


__all__ = ["LossOutput", "gather_with_local_slot", "info_nce", "world_size"]
