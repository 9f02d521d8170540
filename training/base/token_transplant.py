"""Give a backbone's token table the teacher's lexical vectors across two tokenizers (tokenizer transfer).

The small base's LLM learns text semantics from all-MiniLM-L6-v2 (`training.base.distill_text`), but its tokenizer
is Qwen2's byte-level BPE while the teacher's is WordPiece. Before distillation every backbone token gets a vector
from the teacher's word pieces (`lexical_piece_means`), and then the table is refitted so that each teacher word,
as the backbone tokenizes it, averages to the teacher's vector of that word (`fit_whole_word_means`): many words that
the teacher holds whole ("apprehension") reach the backbone as pieces with no meaning of their own ("app" "reh"
"ension"), and the per-token reading alone leaves those words as noise.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from training.common.io_utils import save_safetensors_atomic


LEXICAL_SOURCES = ("input", "output")


def teacher_piece_vectors(batch_size: int = 512, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(V, 384) the teacher's *output* embedding of each of its V word pieces alone: all-MiniLM-L6-v2 run on
    `[CLS] piece [SEP]`, mean-pooled over the three positions (its own pooling) and L2-normalised.

    This is Model2Vec's distillation step (Tulkens & van Dongen, "Model2Vec", 2024: `model2vec.distill.inference.
    create_embeddings`); model2vec's distill extra pins transformers < 5.4, so the ~15 lines are ours. With
    `cache_dir` the table is kept in `cache_dir/minilm-pieces.safetensors` (measured ~70 CPU-s to build, 2 cores).
    """
    from safetensors.torch import load_file

    cache_file = Path(cache_dir) / "minilm-pieces.safetensors" if cache_dir is not None else None
    if cache_file is not None and cache_file.exists():
        return load_file(str(cache_file))["vectors"]
    from training.base.real_parts.minilm import load_minilm

    teacher = load_minilm(device="cpu")
    bert, tokenizer = teacher[0].auto_model.eval(), teacher.tokenizer
    vocab = len(tokenizer)
    rows = []
    with torch.inference_mode():
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(start + batch_size, vocab))
            input_ids = torch.stack([torch.full_like(ids, tokenizer.cls_token_id), ids,
                                     torch.full_like(ids, tokenizer.sep_token_id)], dim=1)
            hidden = bert(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
            rows.append(F.normalize(hidden.mean(dim=1), dim=-1))
    vectors = torch.cat(rows).float().contiguous()
    if cache_file is not None:
        save_safetensors_atomic(cache_file, {"vectors": vectors})
    return vectors


def transplant_token_embeddings(model: torch.nn.Module, tokenizer: Any, seed: int = 0, source: str = "input",
                                cache_dir: str | Path | None = None, word_fit: bool = True) -> dict[str, Any]:
    """Give every token of the backbone's vocabulary a lexical vector from the teacher's word pieces.

    Why: the small backbone's token table is random, so words never seen in distillation stay meaningless (and
    test splits are disjoint from train by construction). Each Qwen2 token string is re-tokenised by MiniLM's
    WordPiece tokenizer, its pieces' vectors (384-d) are averaged, and the table is projected onto the backbone
    width by PCA and rescaled to the original table's standard deviation. `source`: "input" = the teacher's input
    word-piece embeddings; "output" = its sentence embedding of each piece alone (`teacher_piece_vectors`, cached
    in `cache_dir`). With `word_fit` the per-token vectors are first refitted to the teacher's whole words
    (`fit_whole_word_means`). Returns {"tokens", "covered"} (+ "word_fit": the fit's summary). Raises ValueError for
    another `source`.

    Measured before the whole-word fit, on the pipeline's then 80 text test queries (definition -> word, 2 cores): the
    table alone (mean of a text's token vectors) scores hit@1 0.0375 with "input" and 0.1125 with "output"; after 400
    distillation steps the student scores 0.1375 vs 0.150 (dev 0.157 vs 0.160), within one query, so the pipeline
    keeps "input". The whole-word fit: see `fit_whole_word_means`.
    """
    if source not in LEXICAL_SOURCES:
        raise ValueError(f"transplant_token_embeddings: source must be one of {LEXICAL_SOURCES}, got {source!r}")
    from transformers import AutoTokenizer

    from training.base.real_parts.minilm import minilm_model_dir

    teacher_dir = minilm_model_dir()
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if source == "output":
        word_embeddings = teacher_piece_vectors(cache_dir=cache_dir)
    else:
        from safetensors.torch import load_file

        teacher_table = load_file(str(teacher_dir / "model.safetensors"))
        word_embeddings = next(v for k, v in teacher_table.items() if k.endswith("word_embeddings.weight")).float()
    table = model.get_input_embeddings().weight
    if table.shape[1] > word_embeddings.shape[1]:
        raise ValueError(f"transplant_token_embeddings: the token table is {table.shape[1]} wide, wider than the "
                         f"teacher's {word_embeddings.shape[1]}-d lexical vectors it is projected from (by PCA); the "
                         "transplant is for small random backbones (the pipeline's presets), and a pretrained "
                         "backbone's own token table needs none")
    n_tokens = min(len(tokenizer), table.shape[0])
    vectors, covered = lexical_piece_means(tokenizer, teacher_tokenizer, word_embeddings, n_tokens)
    fit = None
    if word_fit:
        vectors, covered, fit = fit_whole_word_means(vectors, covered, tokenizer, teacher_tokenizer, word_embeddings)
    centred = vectors[covered] - vectors[covered].mean(dim=0)
    torch.manual_seed(seed)
    _, _, components = torch.pca_lowrank(centred, q=table.shape[1], center=False)
    projected = centred @ components
    projected = projected * (table.detach().float().std() / projected.std())
    with torch.no_grad():
        table[:n_tokens][covered] = projected.to(table.dtype)
    summary: dict[str, Any] = {"tokens": n_tokens, "covered": int(covered.sum())}
    if fit is not None:
        summary["word_fit"] = fit
    return summary


def flat_ids(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, owner): the token ids of `sequences` end to end and, for each, the index of the sequence it came from
    (both (total,) long tensors) -- the layout `embedding_bag` and `index_add_` read."""
    ids = torch.tensor([i for seq in sequences for i in seq], dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    return ids, torch.repeat_interleave(torch.arange(len(sequences)), lengths)


def lexical_piece_means(tokenizer: Any, teacher_tokenizer: Any, word_embeddings: torch.Tensor,
                        n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_tokens, D) mean teacher piece vector of each of the first `n_tokens` backbone tokens, and the (n_tokens,)
    bool mask of tokens that have one.

    Each token string (the backbone tokenizer's decoder on the token alone; without a decoder, the token itself) is
    re-tokenised by `teacher_tokenizer` without special tokens; its pieces other than [UNK] are averaged over rows of
    `word_embeddings` (teacher vocab x D). A token with no such piece (whitespace, [UNK] only) gets zeros and False.
    Both tokenizers must be fast (a `backend_tokenizer`); `teacher_tokenizer`'s backend padding and truncation are
    turned off. The backends' batch encoder and one `embedding_bag` give the same means as a Python loop over the
    ~150k tokens (tests/base/test_distill_text.py keeps that loop as the reference), ~4 s instead of ~18 s.
    """
    for name, tok in (("tokenizer", tokenizer), ("teacher_tokenizer", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"lexical_piece_means: {name} ({type(tok).__name__}) must be a fast tokenizer (a Rust "
                             "`backend_tokenizer`; load it with use_fast=True)")
    decoder = tokenizer.backend_tokenizer.decoder  # None: the token string itself, as convert_tokens_to_string
    decode = decoder.decode if decoder is not None else " ".join
    pieces = [decode([t]) for t in tokenizer.convert_ids_to_tokens(list(range(n_tokens)))]
    backend = teacher_tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    encoded = backend.encode_batch(pieces, add_special_tokens=False)
    piece_ids, owner = flat_ids([e.ids for e in encoded])
    known = piece_ids != teacher_tokenizer.unk_token_id
    piece_ids, owner = piece_ids[known], owner[known]
    counts = torch.bincount(owner, minlength=n_tokens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    return F.embedding_bag(piece_ids, word_embeddings, offsets, mode="mean"), counts > 0


def teacher_whole_words(teacher_tokenizer: Any, min_letters: int = 2) -> list[str]:
    """The teacher vocabulary's whole words: pieces that are not continuations ("##ing"), of ASCII letters only and
    at least `min_letters` long, sorted (21,719 for all-MiniLM-L6-v2's uncased WordPiece at the default)."""
    return sorted(piece for piece in teacher_tokenizer.get_vocab()
                  if piece.isascii() and piece.isalpha() and len(piece) >= min_letters)


def fit_whole_word_means(vectors: torch.Tensor, covered: torch.Tensor, tokenizer: Any, teacher_tokenizer: Any,
                         word_embeddings: torch.Tensor, ridge: float = 0.1, max_iterations: int = 500,
                         tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Refit the per-token vectors so that each teacher whole word, as the backbone tokenizes it, averages to the
    teacher's vector of that word. Returns (the refitted (n_tokens, D) vectors, the (n_tokens,) covered mask grown by
    the tokens the fit reached, a summary {"words", "forms", "tokens_fitted", "iterations", "loss_before",
    "loss_after"}).

    vectors, covered: `lexical_piece_means`' output (the per-token reading, D = the teacher's width); word_embeddings:
    the teacher's (teacher vocab, D) rows the transplant reads. Words: `teacher_whole_words`, each in the four forms
    it reaches a tokenizer in (" word", "word", " Word", "Word": after a space or at a text's start, lower case or
    capitalised); the teacher lowercases, so all four share the word's one teacher row. Objective, a ridge least
    squares over the words' forms F and the backbone tokens T they use (A: F x T, row f = 1/len(f) on f's tokens):
        mean_F || (A V)[f] - E[word(f)] ||^2  +  ridge * mean_T || V[t] - vectors[t] ||^2
    (the ridge keeps each token near its own reading where the words do not pin it down), solved through its normal
    equations (A^T A + c I) V = A^T B + c V0 column by column with scipy's conjugate gradients and a Jacobi
    preconditioner (each column stops when its residual falls below `tolerance` times its right-hand side's norm,
    or after `max_iterations` with a warning; the summary's "iterations" is the most any column took). With the
    real tokenizers: 16-17 iterations a column, the solve ~4 s for all 384 columns and the whole call ~7 s on 2
    cores, within 1e-5 of scipy's sparse LU solution (`spsolve`, 32 s). A token in no form keeps its row; a form
    with a token beyond the table is left out. Raises ValueError for tables of other widths, a `covered` that is not
    a bool mask of `vectors`' rows, a negative or non-finite `ridge`, fewer teacher rows than its vocabulary, a
    `tolerance` that is not a finite number > 0, `max_iterations` < 1, or non-finite values in the rows it reads.

    Why: `lexical_piece_means` reads each backbone token alone, so a word the backbone splits into pieces with no
    meaning of their own ("app" "reh" "ension") averages to noise while the teacher holds it whole ("apprehension").
    Measured on the small preset's text test (240 definition -> word queries in pools of 80, 2 cores), the mean of a
    text's token vectors (the table alone, no LLM) scores hit@1 0.075 per-token vs 0.388 fitted (0.396 after the
    transplant's PCA to 128); the teacher's own WordPiece table scores 0.300. `ridge` chosen on the 80-pair text dev
    split the same way: 0.01 / 0.1 / 1 / 10 -> 0.263 / 0.288 / 0.238 / 0.138 (test 0.388 / 0.388 / 0.342 / 0.200).
    Libraries for tokenizer transfer (FOCUS, WECHSEL, ZeTT) need fastText embeddings or a hypernetwork from the Hub,
    none of which installs offline, so this least-squares fit is ours.
    """
    if vectors.dim() != 2 or word_embeddings.dim() != 2 or vectors.shape[1] != word_embeddings.shape[1]:
        raise ValueError(f"fit_whole_word_means: vectors {tuple(vectors.shape)} and word_embeddings "
                         f"{tuple(word_embeddings.shape)} must be (rows, D) tables of the same width D")
    n_tokens = vectors.shape[0]
    if covered.shape != (n_tokens,) or covered.dtype != torch.bool:
        raise ValueError(f"fit_whole_word_means: covered ({tuple(covered.shape)}, {covered.dtype}) must be a bool "
                         f"mask of one entry per row of vectors {tuple(vectors.shape)}")
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"fit_whole_word_means: ridge must be a finite number >= 0, got {ridge}")
    if not (tolerance > 0 and math.isfinite(tolerance)):  # scipy's cg would iterate past an exact solve into 0/0
        raise ValueError(f"fit_whole_word_means: tolerance must be a finite number > 0, got {tolerance}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"fit_whole_word_means: max_iterations must be an integer >= 1, got {max_iterations!r}")
    words = teacher_whole_words(teacher_tokenizer)
    forms = [form for w in words for form in (" " + w, w, " " + w.capitalize(), w.capitalize())]
    encoded = tokenizer(forms, add_special_tokens=False)["input_ids"] if forms else []
    ids, owner = flat_ids(encoded)
    # A form with a token beyond a smaller table (e.g. a test's cut vocabulary) has no full row of A: left out.
    outside = torch.zeros(len(forms), dtype=torch.bool)
    outside[owner[ids >= n_tokens]] = True
    ids, owner = ids[~outside[owner]], owner[~outside[owner]]
    if ids.numel() == 0:  # nothing to fit: no whole words, or none whose tokens all have rows
        return vectors.detach().clone(), covered.clone(), {"words": len(words), "forms": 0, "tokens_fitted": 0,
                                                            "iterations": 0, "loss_before": 0.0, "loss_after": 0.0}
    word_rows = torch.tensor(teacher_tokenizer.convert_tokens_to_ids(words), dtype=torch.long)
    if int(word_rows.max()) >= word_embeddings.shape[0]:
        raise ValueError(f"fit_whole_word_means: word_embeddings has {word_embeddings.shape[0]} rows, fewer than the "
                         f"teacher tokenizer's vocabulary ({int(word_rows.max()) + 1} at least)")
    targets = word_embeddings.detach()[word_rows].double().repeat_interleave(4, dim=0).numpy()
    ids, owner = ids.numpy(), owner.numpy()
    counts = np.bincount(owner, minlength=len(forms))
    used_forms = np.flatnonzero(counts)
    fitted_tokens, column = np.unique(ids, return_inverse=True)
    form_row = np.full(len(forms), -1)
    form_row[used_forms] = np.arange(len(used_forms))
    n_forms, n_fit = len(used_forms), len(fitted_tokens)
    a = scipy.sparse.csr_matrix((1.0 / counts[owner], (form_row[owner], column)), shape=(n_forms, n_fit))
    b, initial = targets[used_forms], vectors.detach()[torch.from_numpy(fitted_tokens)].double().numpy()
    for name, values in (("word_embeddings' rows of the words", b), ("vectors' rows of the fitted tokens", initial)):
        if not np.isfinite(values).all():  # one NaN would spread through its whole column of the solve
            raise ValueError(f"fit_whole_word_means: {name} hold non-finite values; the fit needs finite inputs")
    shrink = ridge * n_forms / n_fit  # the objective times n_forms: A^T A V + shrink (V - V0) = A^T B
    normal = (a.T @ a + shrink * scipy.sparse.identity(n_fit)).tocsr()
    rhs = a.T @ b + shrink * initial
    jacobi = scipy.sparse.diags(1.0 / normal.diagonal())
    x, iterations, unconverged = np.empty_like(initial), 0, 0
    for d in range(x.shape[1]):
        steps = [0]
        x[:, d], info = scipy.sparse.linalg.cg(normal, rhs[:, d], x0=initial[:, d], rtol=tolerance,
                                               maxiter=max_iterations, M=jacobi,
                                               callback=lambda _: steps.__setitem__(0, steps[0] + 1))
        iterations = max(iterations, steps[0])
        unconverged += info > 0
    if unconverged:
        warnings.warn(f"fit_whole_word_means: {unconverged} of {x.shape[1]} columns stopped at max_iterations="
                      f"{max_iterations} above tolerance={tolerance}; the table is the last iterate", stacklevel=2)

    def loss(v: np.ndarray) -> float:
        return float(((a @ v - b) ** 2).sum() / n_forms + ridge * ((v - initial) ** 2).sum() / n_fit)

    fitted_rows = torch.from_numpy(fitted_tokens)
    fitted = vectors.detach().clone()
    fitted[fitted_rows] = torch.from_numpy(x).to(vectors.dtype)
    grown = covered.clone()
    grown[fitted_rows] = True
    summary = {"words": len(words), "forms": n_forms, "tokens_fitted": n_fit, "iterations": iterations,
               "loss_before": round(loss(initial), 4), "loss_after": round(loss(x), 4)}
    return fitted, grown, summary
