"""CoMa ("Compressing then Matching") pieces: the compression-aware attention mask, answer-only labels, pooling.

Source: CoMa (arXiv 2511.08480, Apache-2.0), as its released code implements it
(Trustworthy-Information-Access/CoMa: `src/loss.py`, `data_prepare/sample.py`):
k compression tokens (32 there: `<|ctoken_pad_0|>`...) are appended after the input, the sequence is
[input | C | question | answer], question and answer see the input only through C, only answer tokens carry the LM
loss (stage 1); stage 2 pools the mean of the compression tokens' last hidden states.

Here each position of a row is labelled by a segment id (`INPUT`, `COMPRESSION`, `QUESTION`, `ANSWER`), so any
padding side and per-segment padding work; `attention_mask` (B, L) marks real tokens (1) and padding (0).
Pure torch, ours (no library builds this mask). The model side lives in the Hub files: `ConanConfig.embedding_pooling=
"compression_mean"` with `compression_token_ids`, `ConanProcessor` appending the tokens, and
`modeling_conan.compression_mean_pool` (by token id); `compression_mean` here (by segment id) shares its masked mean
(`modeling_conan.masked_mean_pool`), so both agree.
"""

from __future__ import annotations

import torch

from training.common import hub_code

INPUT, COMPRESSION, QUESTION, ANSWER = 0, 1, 2, 3
IGNORE_INDEX = -100  # transformers' / torch's cross-entropy ignore index


def _check(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None, caller: str) -> torch.Tensor:
    if segment_ids.dim() != 2:
        raise ValueError(f"{caller}: segment_ids must be (batch, length), got shape {tuple(segment_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(segment_ids, dtype=torch.bool)
    if attention_mask.shape != segment_ids.shape:
        raise ValueError(f"{caller}: attention_mask {tuple(attention_mask.shape)} must match segment_ids "
                         f"{tuple(segment_ids.shape)}")
    return attention_mask.bool()


def compression_attention_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               dtype: torch.dtype | None = None) -> torch.Tensor:
    """4-D attention mask (B, 1, L, L) for rows laid out as [input | compression | question | answer].

    Query position i may attend to key position j iff j <= i (causal), j is a real token, and not (i is a question or
    answer token and j an input token): question and answer reach the input only through the compression tokens.
    A padding query row attends to itself only (so no softmax row is empty; its output is never used).

    Args:
        segment_ids: (B, L) int, `INPUT`/`COMPRESSION`/`QUESTION`/`ANSWER` per position; among real tokens the ids
            must not decrease along the row (the segments come in that order).
        attention_mask: (B, L), 1 for real tokens, 0 for padding; None = no padding.
        dtype: None returns a bool mask (True = may attend); a float dtype returns the additive form transformers
            uses for 4-D masks (0 where allowed, `torch.finfo(dtype).min` elsewhere).
    Raises:
        ValueError: wrong shapes, unknown segment ids, or segments out of order in a row.
    """
    real = _check(segment_ids, attention_mask, "compression_attention_mask")
    if ((segment_ids < INPUT) | (segment_ids > ANSWER)).any():
        raise ValueError(f"compression_attention_mask: segment_ids must be in {INPUT}..{ANSWER} "
                         "(input, compression, question, answer)")
    # padding counts as INPUT for the running maximum, so it never breaks the order check
    running_max = torch.cummax(torch.where(real, segment_ids, torch.zeros_like(segment_ids)), dim=1).values
    out_of_order = real & (segment_ids < running_max)
    if out_of_order.any():
        row = int(out_of_order.any(dim=1).nonzero()[0])
        raise ValueError(f"compression_attention_mask: row {row} has segments out of order; expected "
                         "[input | compression | question | answer] among its real tokens")
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    reads_input_only_through_c = (segment_ids >= QUESTION)[:, :, None] & (segment_ids == INPUT)[:, None, :]
    allowed = causal[None] & real[:, None, :] & ~reads_input_only_through_c
    eye = torch.eye(length, dtype=torch.bool, device=segment_ids.device)[None]
    allowed = torch.where(~real[:, :, None], eye, allowed)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def answer_labels(input_ids: torch.Tensor, segment_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LM labels (B, L) for stage 1: the token id at answer positions, `IGNORE_INDEX` everywhere else (CoMa: only
    answer tokens carry loss). Unshifted, as transformers' `labels` (the LM loss shifts them)."""
    real = _check(segment_ids, attention_mask, "answer_labels")
    if input_ids.shape != segment_ids.shape:
        raise ValueError(f"answer_labels: input_ids {tuple(input_ids.shape)} must match segment_ids "
                         f"{tuple(segment_ids.shape)}")
    return torch.where(real & (segment_ids == ANSWER), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def compression_mean(hidden_states: torch.Tensor, segment_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `hidden_states` (B, L, H) over each row's real compression-token positions -> (B, H), in the input
    dtype (summed in float32). Not normalised: the model L2-normalises after pooling, as for `last_token`.

    Raises ValueError when the shapes disagree or a row has no compression token.
    """
    real = _check(segment_ids, attention_mask, "compression_mean")
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != segment_ids.shape:
        raise ValueError(f"compression_mean: hidden_states {tuple(hidden_states.shape)} must be (batch, length, "
                         f"hidden) with (batch, length) = {tuple(segment_ids.shape)}")
    positions = real & (segment_ids == COMPRESSION)
    missing = (~positions.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"compression_mean: rows {missing} have no compression token (segment id {COMPRESSION})")
    return hub_code.load("modeling_conan").masked_mean_pool(hidden_states, positions)

__all__ = ["ANSWER", "COMPRESSION", "IGNORE_INDEX", "INPUT", "QUESTION", "answer_labels", "compression_attention_mask",
           "compression_mean"]
