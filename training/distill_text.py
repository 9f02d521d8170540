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

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training import hub_code
from training.build_base import save_conan_repo
from training.io_utils import atomic_output_dir, write_json_atomic


def teacher_embeddings(texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Normalised all-MiniLM-L6-v2 vectors for `texts` (computed once: the teacher never changes)."""
    from training.real_parts.minilm import load_minilm

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
) -> dict:
    """Train the LLM of `model_dir` towards the teacher on `texts`; write the result to `out`; return the log."""
    texts = sorted({t.strip() for t in texts if t and t.strip()})
    if len(texts) < batch_size:
        raise ValueError(f"distill_text needs at least batch_size={batch_size} distinct texts, got {len(texts)}.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = hub_code.ConanModel.from_pretrained(model_dir, dtype=torch.float32)
    processor = hub_code.ConanProcessor.from_pretrained(model_dir, trust_remote_code=True)
    targets = teacher_embeddings(texts)
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
        batch = processor.prepare([texts[i] for i in idx])
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
    return {"texts": len(texts), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="a text file, one sentence per line")
    parser.add_argument("--out", required=True)
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
