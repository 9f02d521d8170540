"""Give a small backbone real text semantics by distilling a pretrained sentence embedder into it.

The paper starts from a pretrained VLM; nothing like it installs offline, so the pipeline's small backbone learns
text semantics from all-MiniLM-L6-v2 (a real pretrained embedder shipped in a PyPI wheel) before the specialists.

Data: *groups* of texts that belong together (a WordNet synset's definition, lemmas and example sentences; see
`training.data_sources.wordnet.distillation_synsets`) plus loose texts (the pipeline's own training texts). Each step
draws `batch_size // 2` groups and two texts of each (e.g. a definition and its word), so every batch holds the
pairs that retrieval asks about next to unrelated ones.
Loss (`distillation_loss`): the student's in-batch similarity distribution matched to the teacher's (row-wise KL of
softmax(sim / temperature), the diagonal left out: contrastive KD, which is what last-token-pooled retrieval needs)
plus cosine to the teacher's vector through a throw-away linear head. Only the LLM's layers train (the token table
gets the teacher's lexical vectors by `training.base.token_transplant`, refitted to the teacher's whole words unless
`--no-word-fit`, and stays frozen; vision and audio stay as they are). Every `eval_every` steps the student is scored
on held-out definition -> word pairs (WordNet *dev* nouns) with the teacher's score beside it, and the best step's
weights are the ones saved.

    python -m training.distill_text --model BASE_DIR --texts texts.txt --out DIR [--steps 300] [--wordnet]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.base.steps import DistillSteps
from training.base.token_transplant import LEXICAL_SOURCES, transplant_token_embeddings
from training.common import hub_code
from training.common.repo import load_processor, save_conan_repo
from training.common.io_utils import (atomic_output_dir, check_output_free, save_safetensors_atomic,
                                      write_json_atomic)
from training.evaluation.embed import embed_items
from training.evaluation.metrics import gold_ranks, rank_metrics


def teacher_embeddings(texts: list[str], batch_size: int = 128, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(N, 384) normalised all-MiniLM-L6-v2 vectors for `texts`, each distinct text encoded once.

    The teacher never changes, so with `cache_dir` every vector is kept in `cache_dir/minilm-text.safetensors`
    (text -> vector, merged across calls; written atomically): a rerun or a resumed distillation pays only for texts
    it has not seen. The teacher is the stage's largest cost (measured ~8 ms a definition on one CPU core).
    """
    from safetensors import safe_open

    cache_file = Path(cache_dir) / "minilm-text.safetensors" if cache_dir is not None else None
    known: dict[str, torch.Tensor] = {}
    if cache_file is not None and cache_file.exists():  # the texts ride in the header: one file, one rename
        with safe_open(str(cache_file), framework="pt") as stored:
            known = dict(zip(json.loads(stored.metadata()["texts"]), stored.get_tensor("vectors")))
    missing = sorted({t for t in texts if t not in known})
    if missing:
        from training.base.real_parts.minilm import load_minilm

        teacher = load_minilm(device="cpu")
        vectors = teacher.encode(missing, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        known.update(zip(missing, vectors.float().cpu()))
        if cache_file is not None:
            names = list(known)
            save_safetensors_atomic(cache_file, {"vectors": torch.stack([known[n] for n in names]).contiguous()},
                                    metadata={"texts": json.dumps(names)})
    if not texts:
        return torch.zeros(0, 384)
    return torch.stack([known[t] for t in texts])


def retrieval_hit_at_1(queries: torch.Tensor, candidates: torch.Tensor, gold: list[int]) -> float:
    """hit@1 of `queries` (Q, D) ranking `candidates` (C, D) by dot product; ties counted against (as stage_eval)."""
    scores = (queries @ candidates.T).numpy()
    return float(rank_metrics(gold_ranks(scores, gold), ks=(1,))["hit@1"])


def _pairs_as_retrieval(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str], list[int]]:
    """(queries, distinct candidates, gold index of each query's candidate)."""
    candidates = sorted({doc for _, doc in pairs})
    index = {c: i for i, c in enumerate(candidates)}
    return [q for q, _ in pairs], candidates, [index[d] for _, d in pairs]


def teacher_hit_at_1(pairs: list[tuple[str, str]], cache_dir: str | Path | None = None) -> float:
    """The teacher's hit@1 on (query, document) text pairs, every distinct document a candidate (its ceiling)."""
    queries, candidates, gold = _pairs_as_retrieval(pairs)
    vectors = teacher_embeddings(queries + candidates, cache_dir=cache_dir)
    return retrieval_hit_at_1(vectors[: len(queries)], vectors[len(queries):], gold)


def teacher_text_scores(data_dir: str | Path, modality: str = "text", limit: int | None = None,
                        pool_size: int | None = None) -> dict[str, float]:
    """The teacher's {"hit@1", "n_queries", "n_candidates", "pools"} on the pipeline's
    `data_dir/<modality>/test.jsonl`, with the protocol of `training.evaluation.stage_eval` (the first `limit` rows;
    every distinct test positive of the query's candidate pool is a candidate, pools of at most `pool_size` rows as
    `stage_eval.candidate_pools`; text rows only). The teacher sees no instruction (it has none). Raises
    FileNotFoundError if the file is absent."""
    from training.evaluation.stage_eval import pool_views, pooled_scores, score_similarity

    path = Path(data_dir) / modality / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    pairs = [(r["query"]["text"], r["positive"]["text"]) for r in rows
             if isinstance(r["query"].get("text"), str) and isinstance(r["positive"].get("text"), str)]
    queries, candidates, gold = _pairs_as_retrieval(pairs)
    vectors = teacher_embeddings(queries + candidates)  # the teacher loads and encodes once, all pools together
    similarity = (vectors[: len(queries)] @ vectors[len(queries):].T).numpy()
    parts = [score_similarity(block, block_gold) for _, _, block, block_gold in pool_views(similarity, gold, pool_size)]
    return {k: v for k, v in pooled_scores(parts).items() if k in ("hit@1", "n_queries", "n_candidates", "pools")}


def distillation_loss(student: torch.Tensor, projected: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 0.05, cosine_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Contrastive KD: KL(teacher || student) of the in-batch similarity distributions, plus cosine via the head.

    student: (B, H) normalised student embeddings; projected: (B, D) the head's image of them; teacher: (B, D)
    normalised teacher vectors. Row i's distribution is softmax over j != i of sim(i, j) / `temperature` (the
    diagonal is always 1 and carries nothing). Returns {"loss", "kd", "cosine"} (scalars).
    """
    if student.shape[0] != teacher.shape[0] or student.shape[0] < 3:
        raise ValueError(f"distillation_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "need the same batch size, at least 3")
    mask = torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    s_logits = (student @ student.T / temperature).masked_fill(mask, float("-inf"))
    t_logits = (teacher @ teacher.T / temperature).masked_fill(mask, float("-inf"))
    t_prob = t_logits.softmax(-1)
    kd = (t_prob * (t_logits.log_softmax(-1) - s_logits.log_softmax(-1)).masked_fill(mask, 0.0)).sum(-1).mean()
    cosine = (1 - F.cosine_similarity(projected, teacher, dim=-1)).mean()
    return {"loss": kd + cosine_weight * cosine, "kd": kd, "cosine": cosine}


def pair_contrastive_loss(student: torch.Tensor, pairs: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE of each pair's first row (a definition) against every other row of the batch, its partner (a word or
    example of the same synset) the target: the hard-label counterpart of the KD term for the pairs retrieval asks
    about. student: (B, H) normalised; pairs: (P, 2) long row indices. Returns a scalar (0 when P = 0)."""
    if pairs.numel() == 0:
        return student.sum() * 0.0
    logits = student[pairs[:, 0]] @ student.T / temperature
    logits = logits.masked_fill(F.one_hot(pairs[:, 0], student.shape[0]).bool(), float("-inf"))
    return F.cross_entropy(logits, pairs[:, 1])


class BestStep:
    """Keeps a copy of the trainable weights at the best dev score seen so far (ties keep the earlier step)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.score = float("-inf")
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, step: int, score: float, model: torch.nn.Module) -> bool:
        """Record `score` at `step`; copy `model`'s trainable parameters if it beats the best. Returns whether it did."""
        if score <= self.score:
            return False
        self.step, self.score = step, score
        self.state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return True

    def restore(self, model: torch.nn.Module) -> None:
        """Put the best step's weights back into `model` (no-op when nothing was recorded)."""
        if self.state is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.state.items():
                params[name].copy_(value)


def _draw_batches(groups: list[list[str]], steps: int, batch_size: int, rng: random.Random) -> list[list[str]]:
    """Per step, `batch_size` distinct texts: from each drawn group its first text (a definition) and one other
    (a word or an example sentence); a one-text group gives its text once.

    Groups are visited in a shuffled order, every group once before any group again (epochs), so a run of
    `steps * batch_size / 2` group draws sees that many distinct groups: more distinct texts, not more passes over
    the same ones, is what transfers the teacher (measured: docstring of `distill_text`).
    """
    order: list[int] = []
    batches = []
    for _ in range(steps):
        batch: list[str] = []
        seen: set[str] = set()
        tried = 0
        while len(batch) < batch_size and tried < len(groups):
            if not order:
                order = rng.sample(range(len(groups)), len(groups))
            group = groups[order.pop()]
            tried += 1
            for text in [group[0], rng.choice(group[1:])] if len(group) > 1 else group:
                if text not in seen and len(batch) < batch_size:
                    seen.add(text)
                    batch.append(text)
        batches.append(batch)
    return batches


def distill_text(
    model_dir: str | Path,
    texts: list[str],
    out: str | Path,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    overwrite: bool = False,
    transplant: bool = True,
    lexical_source: str = "input",
    word_fit: bool = True,
    instructions: list[str | None] | None = None,
    groups: list[list[str]] | None = None,
    dev_pairs: list[tuple[str, str]] | None = None,
    dev_instruction: str | None = None,
    eval_every: int = 100,
    temperature: float = 0.05,
    cosine_weight: float = 1.0,
    pair_weight: float = 0.0,
    teacher_cache_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    save_every: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train the LLM of `model_dir` towards the teacher; write the best step's model to `out`; return the log.

    texts: loose texts (each its own group); groups: lists of texts that belong together (see the module doc).
    instructions: system instructions drawn per text (None = the processor default), so the student's semantics
    hold under the instructions the later stages and evaluation use. dev_pairs: (query, document) text pairs
    disjoint from training and test, scored every `eval_every` steps (query under `dev_instruction`, documents
    under the default) beside the teacher's score; the best step is saved. Without dev_pairs the last step is saved.
    pair_weight: weight of `pair_contrastive_loss` (definition -> its partner in the batch, hard labels) added to
    the KD loss (0 = KD only).
    With `transplant`, the token table first gets the teacher's lexical vectors (`transplant_token_embeddings`,
    from its input embeddings or, with `lexical_source="output"`, its embeddings of each word piece), refitted to the
    teacher's whole words with `word_fit` (`training.base.token_transplant.fit_whole_word_means`).
    teacher_cache_dir: where the teacher's vectors are kept across runs (`teacher_embeddings`).
    The optimizer steps run on the shared loop (`training.contrastive.loop.run_steps`: gradient clipping at 1.0,
    non-finite loss check, progress). With `checkpoint_dir` and `save_every` > 0 the trainable weights, the head,
    optimizer, scheduler, logs and best dev step are saved every `save_every` steps (newest kept), and with `resume`
    a rerun continues from the newest one (the batches and instructions are drawn from `seed` up front, so the
    resumed run trains on what the uninterrupted one would). The model stays on the CPU.
    Raises ValueError when there are fewer distinct texts than `batch_size`, FileExistsError (before any work)
    when `out` exists and `overwrite` is False.
    """
    check_output_free(out, overwrite)
    if steps < 1:
        raise ValueError(f"distill_text: steps must be >= 1, got {steps}")
    all_groups = [list(dict.fromkeys(t.strip() for t in g if t and t.strip())) for g in (groups or [])]
    all_groups += [[t] for t in sorted({t.strip() for t in texts if t and t.strip()})]
    all_groups = [g for g in all_groups if g]
    n_texts = len({t for g in all_groups for t in g})
    if n_texts < batch_size or batch_size < 3:
        raise ValueError(f"distill_text needs batch_size >= 3 and at least batch_size={batch_size} distinct texts, "
                         f"got {n_texts}.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = _draw_batches(all_groups, steps, batch_size, rng)
    used = sorted({t for b in batches for t in b})
    targets = teacher_embeddings(used, cache_dir=teacher_cache_dir)
    # Definitions and loose texts are queries (drawn instructions); words and examples are documents (default).
    queries = {g[0] for g in all_groups}
    group_of: dict[str, int] = {}
    for index, group in enumerate(all_groups):
        for text in group:
            group_of.setdefault(text, index)
    # (definition row, partner row) of each batch: `_draw_batches` puts a group's partner right after its definition.
    batch_pairs = [torch.tensor([[i, i + 1] for i in range(len(b) - 1) if b[i] in queries
                                 and group_of[b[i]] == group_of[b[i + 1]]], dtype=torch.long).reshape(-1, 2)
                   for b in batches]
    row = {t: i for i, t in enumerate(used)}
    teacher_seconds, teacher_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model = hub_code.ConanModel.from_pretrained(model_dir, dtype=torch.float32)
    processor = load_processor(model_dir)
    coverage = transplant_token_embeddings(model, processor.tokenizer, seed, lexical_source, teacher_cache_dir,
                                           word_fit=word_fit) if transplant else None
    for name, param in model.named_parameters():
        # The 151k-row embedding table stays frozen: updating it costs more than the rest of the step together,
        # and it keeps the transplanted lexical vectors of words never seen in distillation (all test words).
        param.requires_grad = name.startswith("backbone.language_model.") and "embed_tokens" not in name
    head = torch.nn.Linear(model.config.text_config.hidden_size, targets.shape[1])
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    dev = None
    if dev_pairs:
        dev_queries, dev_candidates, dev_gold = _pairs_as_retrieval(dev_pairs)
        dev = {"teacher_hit@1": teacher_hit_at_1(dev_pairs, teacher_cache_dir), "n_queries": len(dev_queries),
               "n_candidates": len(dev_candidates), "log": []}
    best = BestStep()

    def check_dev(step: int) -> None:
        model.eval()
        q = embed_items(model, processor, dev_queries, [dev_instruction] * len(dev_queries), batch_size=64)
        c = embed_items(model, processor, dev_candidates, None, batch_size=64)
        model.train()
        score = retrieval_hit_at_1(q, c, dev_gold)
        dev["log"].append({"step": step, "hit@1": score})
        best.update(step, score, model)
        print(f"[distill text] step {step}: dev hit@1 {score:.3f} (teacher {dev['teacher_hit@1']:.3f})", flush=True)

    log: list[dict[str, float]] = []
    choices = instructions or [None]
    # Drawn up front with the batches, so a resumed run sees the same instructions as an uninterrupted one.
    prompts = [[rng.choice(choices) if t in queries else None for t in b] for b in batches]
    runner = DistillSteps(model, head, optimizer, schedule, checkpoint_dir, save_every)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "texts": n_texts,
                "temperature": temperature, "cosine_weight": cosine_weight, "pair_weight": pair_weight}
    if lexical_source != "input":  # recorded only when not the default, so checkpoints from before it still resume
        settings["lexical_source"] = lexical_source
    if transplant and word_fit:  # checkpoints from before the fit were made without it: they must not resume here
        settings["word_fit"] = True
    if not transplant:  # recorded only when off (the default is on), so checkpoints from before it still resume
        settings["transplant"] = False
    saved = runner.resume(resume, settings)
    if saved is not None:
        log = saved["log"]
        if dev is not None:
            dev["log"] = saved["dev_log"]
        best.step, best.score, best.state = saved["best_step"], saved["best_score"], saved["best_state"]
    elif dev is not None:
        check_dev(0)
    model.train()

    def forward_backward(step: int) -> dict[str, Any]:
        batch_texts = batches[step]
        parsed = [processor.parse_input(t, i) for i, t in enumerate(batch_texts)]
        student = model(**processor.prepare_parsed(parsed, prompts[step])).embeddings
        parts = distillation_loss(student, head(student), targets[[row[t] for t in batch_texts]], temperature,
                                  cosine_weight)
        if pair_weight:
            parts["pair"] = pair_contrastive_loss(student, batch_pairs[step], temperature)
            parts["loss"] = parts["loss"] + pair_weight * parts["pair"]
        parts["loss"].backward()
        return {k: v.item() for k, v in parts.items()}

    def after_step(done: int, logs: dict[str, Any]) -> bool:
        if done % 20 == 1 or done == steps:
            log.append({"step": done - 1, **{k: logs[k] for k in ("loss", "kd", "cosine", "pair") if k in logs}})
        if dev is not None and (done % eval_every == 0 or done == steps):
            check_dev(done)
        return False

    runner.run(steps, params, forward_backward, after_step, desc="distill text", progress=progress,
               extra_state=lambda: {"log": log, "dev_log": dev["log"] if dev is not None else [],
                                    "best_step": best.step, "best_score": best.score, "best_state": best.state})
    best.restore(model)
    model.eval()
    result = {"texts": n_texts, "texts_used": len(used), "groups": len(all_groups), "steps": steps,
              "batch_size": batch_size, "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
              "transplant": coverage, "teacher_seconds": round(teacher_seconds, 1),
              "teacher_cpu_seconds": round(teacher_cpu, 1), "seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(time.process_time() - cpu_start, 1)}
    if dev is not None:
        result["dev"] = {"best_step": best.step, "best_hit@1": best.score, **{k: v for k, v in dev.items()}}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / "distill_log.json", {"teacher": "all-MiniLM-L6-v2", **result, "log": log})
    return result


def wordnet_distillation_data(limit_groups: int | None = None, dev_limit: int = 300,
                              seed: int = 0) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """(groups, dev_pairs) from WordNet: one group per `distillation_synsets` synset (definition, lemmas, examples;
    never a dev/test noun), `limit_groups` of them drawn at random if given; dev pairs = definition -> word of the
    most frequent dev-split nouns. Raises SourceMissing when WordNet is not installed."""
    from training.data_sources.wordnet import dev_definition_pairs, distillation_synsets

    synsets = distillation_synsets()
    if limit_groups is not None and limit_groups < len(synsets):
        synsets = random.Random(seed).sample(synsets, limit_groups)
    groups = [[s.gloss, *s.lemmas, *s.examples] for s in synsets]
    return groups, dev_definition_pairs(limit=dev_limit)


def main(argv: list[str] | None = None) -> None:
    from training.common.cli import require_model_folder, user_errors

    parser = argparse.ArgumentParser(prog="python -m training.distill_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Conan model folder (e.g. the undistilled small base)")
    parser.add_argument("--texts", default=None, help="a text file, one sentence per line")
    parser.add_argument("--output", "--out", dest="out", required=True)
    parser.add_argument("--wordnet", action="store_true",
                        help="add WordNet's distillation corpus and check on WordNet dev nouns (needs wordnet-base)")
    parser.add_argument("--wordnet-groups", type=int, default=None, help="draw at most this many WordNet synsets")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--cosine-weight", type=float, default=1.0)
    parser.add_argument("--pair-weight", type=float, default=0.0,
                        help="weight of the definition -> partner InfoNCE beside the KD (0 = KD only)")
    parser.add_argument("--teacher-cache", default=None, help="folder that keeps the teacher's vectors across runs")
    parser.add_argument("--lexical-source", choices=LEXICAL_SOURCES, default="input",
                        help="token-table transplant from the teacher's input word-piece embeddings or its output "
                             "embedding of each piece (Model2Vec-style; ~1 CPU-min once, cached in --teacher-cache)")
    parser.add_argument("--no-word-fit", dest="word_fit", action="store_false",
                        help="keep the per-token transplant without refitting it to the teacher's whole words")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if not args.texts and not args.wordnet:
        parser.error("give --texts FILE, --wordnet or both")
    require_model_folder(parser, "--model", args.model)
    from training.data_sources.wordnet import INSTRUCTION

    with user_errors(parser):
        check_output_free(args.out, args.force)
        texts = Path(args.texts).read_text().splitlines() if args.texts else []
        groups, dev_pairs = wordnet_distillation_data(args.wordnet_groups, seed=args.seed) if args.wordnet else ([], None)
        result = distill_text(args.model, texts, args.out, args.steps, args.batch_size, args.lr, seed=args.seed,
                              overwrite=args.force, instructions=[None, INSTRUCTION], groups=groups,
                              dev_pairs=dev_pairs, dev_instruction=INSTRUCTION, eval_every=args.eval_every,
                              temperature=args.temperature, cosine_weight=args.cosine_weight,
                              pair_weight=args.pair_weight, teacher_cache_dir=args.teacher_cache,
                              lexical_source=args.lexical_source, word_fit=args.word_fit)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
