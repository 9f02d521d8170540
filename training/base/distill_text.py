"""Give a small backbone real text semantics by distilling a pretrained sentence embedder into it.

The paper starts from a pretrained VLM; nothing like it installs offline, so the pipeline's small backbone learns
text semantics from all-MiniLM-L6-v2 (a real pretrained embedder shipped in a PyPI wheel) before the specialists.
Loss: cosine to the teacher's vector through a throw-away linear head, plus matching the teacher's in-batch
similarity matrix (relational, dimension-free). Only the LLM trains; vision tower and audio path stay as they are.

    python -m training.distill_text --model BASE_DIR --texts texts.txt --out DIR [--steps 300]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.common import hub_code
from training.common.repo import save_conan_repo
from training.common.io_utils import atomic_output_dir, write_json_atomic


def transplant_token_embeddings(model: torch.nn.Module, tokenizer: Any, seed: int = 0) -> dict[str, float]:
    """Give every token of the backbone's vocabulary a lexical vector from the teacher's word-piece embeddings.

    Why: the small backbone's token table is random, so words never seen in distillation stay meaningless (and
    test splits are disjoint from train by construction). Each Qwen2 token string is re-tokenised by MiniLM's
    WordPiece tokenizer, its pieces' input embeddings (384-d) are averaged, and the table is projected onto the
    backbone width by PCA and rescaled to the original table's standard deviation.
    """
    from transformers import AutoTokenizer

    from training.base.real_parts.minilm import minilm_model_dir

    teacher_dir = minilm_model_dir()
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    from safetensors.torch import load_file

    teacher_table = load_file(str(teacher_dir / "model.safetensors"))
    word_embeddings = next(v for k, v in teacher_table.items() if k.endswith("word_embeddings.weight")).float()
    table = model.get_input_embeddings().weight
    n_tokens = min(len(tokenizer), table.shape[0])
    pieces = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(range(n_tokens)))]
    encoded = teacher_tokenizer(pieces, add_special_tokens=False)["input_ids"]
    vectors = torch.zeros(n_tokens, word_embeddings.shape[1])
    covered = torch.zeros(n_tokens, dtype=torch.bool)
    for token_id, ids in enumerate(encoded):
        ids = [i for i in ids if i != teacher_tokenizer.unk_token_id]
        if ids:
            vectors[token_id] = word_embeddings[ids].mean(dim=0)
            covered[token_id] = True
    centred = vectors[covered] - vectors[covered].mean(dim=0)
    torch.manual_seed(seed)
    _, _, components = torch.pca_lowrank(centred, q=table.shape[1], center=False)
    projected = centred @ components
    projected = projected * (table.detach().float().std() / projected.std())
    with torch.no_grad():
        table[:n_tokens][covered] = projected.to(table.dtype)
    return {"tokens": n_tokens, "covered": int(covered.sum())}


def teacher_embeddings(texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Normalised all-MiniLM-L6-v2 vectors for `texts` (computed once: the teacher never changes)."""
    from training.base.real_parts.minilm import load_minilm

    teacher = load_minilm(device="cpu")
    vectors = teacher.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    return vectors.float().cpu()


def distill_text(
    model_dir: str | Path,
    texts: list[str],
    out: str | Path,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    relational_weight: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    transplant: bool = True,
    instructions: list[str | None] | None = None,
) -> dict:
    """Train the LLM of `model_dir` towards the teacher on `texts`; write the result to `out`; return the log.

    With `transplant`, the token table first gets the teacher's lexical vectors (`transplant_token_embeddings`).
    `instructions`: system instructions drawn per batch (None = the processor default), so the student's text
    semantics hold under the instructions the later stages and evaluation use.
    """
    texts = sorted({t.strip() for t in texts if t and t.strip()})
    if len(texts) < batch_size:
        raise ValueError(f"distill_text needs at least batch_size={batch_size} distinct texts, got {len(texts)}.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = hub_code.ConanModel.from_pretrained(model_dir, dtype=torch.float32)
    processor = hub_code.ConanProcessor.from_pretrained(model_dir, trust_remote_code=True)
    targets = teacher_embeddings(texts)
    coverage = transplant_token_embeddings(model, processor.tokenizer, seed) if transplant else None
    for name, param in model.named_parameters():
        # The 151k-row embedding table stays frozen: updating it costs more than the rest of the step together.
        param.requires_grad = name.startswith("backbone.language_model.") and "embed_tokens" not in name
    head = torch.nn.Linear(model.config.text_config.hidden_size, targets.shape[1])
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    model.train()
    log = []
    progress = tqdm(range(steps), desc="distill text", leave=False)
    for step in progress:
        idx = rng.sample(range(len(texts)), batch_size)
        batch = processor.prepare([texts[i] for i in idx], instruction=rng.choice(instructions or [None]))
        student = model(**batch).embeddings
        teacher = targets[idx]
        cosine_loss = (1 - F.cosine_similarity(head(student), teacher, dim=-1)).mean()
        relational_loss = F.mse_loss(student @ student.T, teacher @ teacher.T)
        loss = cosine_loss + relational_weight * relational_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "cosine": cosine_loss.item(), "relational": relational_loss.item()})
            progress.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / "distill_log.json", {"teacher": "all-MiniLM-L6-v2", "texts": len(texts), "log": log})
    return {"texts": len(texts), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"], "transplant": coverage}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="a text file, one sentence per line")
    parser.add_argument("--output", "--out", dest="out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    texts = Path(args.texts).read_text().splitlines()
    print(distill_text(args.model, texts, args.out, args.steps, args.batch_size, args.lr, seed=args.seed,
                       overwrite=args.force))


if __name__ == "__main__":
    main()
