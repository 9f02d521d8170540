"""CoMa stage 1 (training/coma): QA rows from pair files, the answer LM loss against a hand computation, the
compression mask reaching the backbone's attention, exact resume, and the refusal of a base without compression
tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from training.coma import stage
from training.coma.data import CompressionCollator, load_qa_rows
from training.contrastive.compression import ANSWER, COMPRESSION, IGNORE_INDEX, INPUT, QUESTION
from training.contrastive.trainer import checkpoint_dirs



@pytest.fixture(scope="module")
def coma_base(tiny_compression_repo) -> Path:
    """The tiny base built with compression tokens (tests/conftest.py, `compression_tokens=COMPRESSION_K`)."""
    return Path(tiny_compression_repo)


def _k(base: Path) -> int:
    return len(json.loads((base / "config.json").read_text())["compression_token_ids"])

@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    """Pair rows in the pipeline's shapes: image query -> label text, text query -> image positive (emoji), a
    gloss -> word (text both sides)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs")
    rows = []
    for i, (colour, name) in enumerate([((255, 0, 0), "red square"), ((0, 0, 255), "blue square"),
                                        ((0, 255, 0), "green square"), ((250, 250, 0), "yellow square")]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        rows.append({"query": {"image": f"{i}.png"}, "positive": {"text": f"a photo of a {name}"},
                     "source": "colours"})
        rows.append({"query": {"text": name}, "positive": {"image": f"{i}.png"}, "source": "names"})
        rows.append({"query": {"text": f"the colour number {i} of a traffic light set"}, "positive": {"text": name},
                     "source": "glosses"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_qa_rows_take_the_media_side_as_input_and_the_label_as_answer(pair_file):
    rows = load_qa_rows([pair_file])
    assert len(rows) == 12
    image_q, name_q, gloss = rows[0], rows[1], rows[2]
    assert image_q.input == {"image": str(pair_file.parent / "0.png")} and image_q.answer == "a photo of a red square"
    assert image_q.question == "What is shown in the image?"
    assert name_q.input == {"image": str(pair_file.parent / "0.png")} and name_q.answer == "red square"
    assert gloss.input["text"].startswith("the colour number 0") and gloss.answer == "red square"
    assert gloss.question == "Which word does this text define?"


def test_collator_lays_out_input_c_question_answer(coma_base, pair_file):
    from training.common import hub_code

    processor = hub_code.ConanProcessor.from_pretrained(coma_base)
    ids = json.loads((coma_base / "config.json").read_text())["compression_token_ids"]
    batch = CompressionCollator(processor, ids)(load_qa_rows([pair_file])[:3])
    seg, mask, input_ids = batch["segment_ids"], batch["attention_mask"], batch["input_ids"]
    assert seg.shape == input_ids.shape == mask.shape == batch["mm_token_type_ids"].shape
    for b in range(3):
        real = mask[b].bool()
        s = seg[b][real].tolist()
        assert s == sorted(s) and set(s) == {INPUT, COMPRESSION, QUESTION, ANSWER}  # in order, all four present
        assert input_ids[b][real][torch.tensor(s) == COMPRESSION].tolist() == ids
        assert not real[int(real.sum()):].any()  # right padding
    answer = processor.tokenizer.decode(input_ids[1][seg[1] == ANSWER][:-1])
    assert answer == "red square"
    assert "pixel_values" in batch and (batch["mm_token_type_ids"][0] == 1).any()


def test_answer_lm_loss_matches_a_hand_computed_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 3)
    weight = torch.randn(7, 3)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3], labels[0, 4], labels[1, 2] = 4, 1, 6
    loss, count = stage.answer_lm_loss(hidden, weight, labels)
    terms = []
    for b, t in [(0, 3), (0, 4), (1, 2)]:  # the token at t is predicted from position t - 1
        logits = [float(hidden[b, t - 1] @ weight[v]) for v in range(7)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        terms.append(log_z - logits[int(labels[b, t])])
    assert count == 3
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="no answer token"):
        stage.answer_lm_loss(hidden, weight, torch.full((2, 5), IGNORE_INDEX))


def test_answer_reads_the_input_only_through_the_compression_tokens(coma_base):
    """In the real backbone, through the public path (ConanModel.forward with the 4-D CoMa mask as attention_mask
    and the 2-D padding mask as padding_mask, as the stage calls it): changing an input token changes the
    compression tokens' hidden states, but with the compression tokens' keys and values held fixed (they are computed
    from the first forward and patched into the second), the answer's hidden states, and so the stage's answer LM
    loss, do not move. Without the CoMa mask they do (the check can fail)."""
    from training.common import hub_code
    from training.contrastive.compression import compression_attention_mask

    model = hub_code.ConanModel.from_pretrained(coma_base, dtype=torch.float32).eval()
    ids = json.loads((coma_base / "config.json").read_text())["compression_token_ids"]
    K = _k(coma_base)
    comp, held, answer = slice(6, 6 + K), slice(6, 8 + K), slice(8 + K, None)  # C, C + question, answer
    seg = torch.tensor([[INPUT] * 6 + [COMPRESSION] * K + [QUESTION] * 2 + [ANSWER] * 3])
    a = torch.tensor([[101, 102, 103, 104, 105, 106, *ids, 121, 122, 131, 132, 133]])  # plain text ids
    b = a.clone()
    b[0, 2] = 140  # a different input token
    mask = torch.ones_like(a)

    def hidden(input_ids: torch.Tensor, use_mask: bool) -> torch.Tensor:
        if not use_mask:
            return model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        coma = compression_attention_mask(seg, mask)
        return model(input_ids=input_ids, attention_mask=coma, padding_mask=mask).last_hidden_state

    def loss(input_ids: torch.Tensor) -> float:  # the stage's own forward + answer LM loss
        return float(stage.compressed_lm_loss(
            model, {"input_ids": input_ids, "attention_mask": mask, "segment_ids": seg})[0])

    with torch.no_grad():
        ha, hb = hidden(a, True), hidden(b, True)
        assert not torch.allclose(ha[0, comp], hb[0, comp])  # the compression tokens read the input
        # the answer reads the changed compression states, so with nothing held fixed it changes too
        assert not torch.allclose(ha[0, answer], hb[0, answer])
        # fix the compression tokens' per-layer keys/values: record them in run a, replay them in run b
        layers = model.backbone.language_model.layers
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(i):
            def hook(module, args, kwargs):
                states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                saved[i] = states[:, held].clone()
            return hook

        def replay(i):
            def hook(module, args, kwargs):
                if "hidden_states" in kwargs:
                    h = kwargs["hidden_states"].clone()
                    h[:, held] = saved[i]
                    kwargs["hidden_states"] = h
                    return args, kwargs
                h = args[0].clone()
                h[:, held] = saved[i]
                return (h, *args[1:]), kwargs
            return hook

        def held_fixed(run_a, run_b):
            handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
            out_a = run_a()
            for h in handles:
                h.remove()
            handles = [layer.register_forward_pre_hook(replay(i), with_kwargs=True) for i, layer in enumerate(layers)]
            out_b = run_b()
            for h in handles:
                h.remove()
            return out_a, out_b

        for use_mask, should_match in ((True, True), (False, False)):
            ha, hb = held_fixed(lambda: hidden(a, use_mask), lambda: hidden(b, use_mask))
            # compression + question positions enter every layer equal in both runs; the answer then matches
            # only if it cannot see the input positions
            assert torch.allclose(ha[0, answer], hb[0, answer], atol=1e-6) == should_match, use_mask
        assert loss(a) != loss(b)  # the loss reads the input (through the compression tokens)
        loss_a, loss_b = held_fixed(lambda: loss(a), lambda: loss(b))
        assert loss_a == pytest.approx(loss_b, abs=1e-6)


def _config(tmp_path: Path, base: Path, data: Path, name: str, **train) -> stage.ComaConfig:
    raw = {
        "name": name, "base": str(base), "output": str(tmp_path / name), "seed": 0,
        "data": {"train": [str(data)], "check_media": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"]},
        "train": {"per_device_batch_size": 3, "max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "schedule": "cosine",
                  "log_every": 1, "save_every": 2, **train},
    }
    return stage.load_config(None, raw=raw)


def test_stage_resumes_exactly_exports_a_conan_repo_and_moves_only_compression_rows(coma_base, pair_file, tmp_path):
    full = stage.train(_config(tmp_path, coma_base, pair_file, "straight"), resume="never")
    assert full["steps"] == 4 and full["output"]
    broken_cfg = _config(tmp_path, coma_base, pair_file, "broken")
    first = stage.train(broken_cfg, resume="never", stop_after=2)
    assert first["output"] is None
    assert [p.name for p in checkpoint_dirs(broken_cfg.checkpoint_dir)] == ["step_00000002"]
    second = stage.train(broken_cfg, resume="auto")
    assert [h["loss"] for h in first["history"] + second["history"]] == [h["loss"] for h in full["history"]]
    out_a = load_file(Path(full["output"]) / "model.safetensors")
    out_b = load_file(Path(second["output"]) / "model.safetensors")
    assert out_a.keys() == out_b.keys() and all(torch.equal(out_a[k], out_b[k]) for k in out_a)

    base = load_file(coma_base / "model.safetensors")
    assert out_a.keys() == base.keys()  # a plain Conan repo: no LM head, no LoRA names
    key = next(k for k in base if k.endswith("embed_tokens.weight"))
    ids = json.loads((coma_base / "config.json").read_text())["compression_token_ids"]
    moved = (out_a[key] != base[key]).any(dim=1).nonzero().flatten().tolist()
    assert moved == ids  # only the compression rows of the embedding table were trained
    assert any(not torch.equal(out_a[k], base[k]) for k in base if "layers.0.self_attn.q_proj" in k)  # LoRA merged
    from training.common.repo import load_conan

    model, _ = load_conan(full["output"])
    assert model.config.compression_token_ids == ids
    assert json.loads((Path(full["output"]) / stage.MANIFEST).read_text())["steps"] == 4


def test_stage_refuses_a_base_without_compression_tokens(tiny_repo, pair_file, tmp_path):
    cfg = _config(tmp_path, tiny_repo, pair_file, "plain")
    with pytest.raises(ValueError, match="has no compression tokens.*--compression-tokens"):
        stage.train(cfg, resume="never")
    assert stage.main(["--config", str(_write(tmp_path, cfg)), "--force"]) == 2


def _write(tmp_path: Path, cfg: stage.ComaConfig) -> Path:
    path = tmp_path / "coma.yaml"
    raw = cfg.to_dict()
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_shipped_config_loads():
    cfg = stage.load_config(Path(__file__).resolve().parents[2] / "training/configs/coma_small.yaml")
    assert cfg.train_compression_tokens and cfg.lora.r == 16 and len(cfg.data.train) == 5
    assert all(p.endswith("/train.jsonl") for p in cfg.data.train)  # stage 1 never reads dev/test
