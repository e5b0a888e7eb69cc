"""VQA head, caption decoder, beam search, multi-task batches and training."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from glipv2.captioning import beam_search
from glipv2.checkpoint import CheckpointError, init_weights
from glipv2.modeling import box_ops
from glipv2.modeling.caption import object_input_size
from glipv2.modeling.glipv2 import build_model
from glipv2.config import LossConfig, ModelConfig
from glipv2.modeling.vqa import EXTREMES, Extremes, VqaHead, extreme_coordinates
from glipv2.predict import TorchUnderstanding
from training.batch import Collator
from training import shapes_world as sw
from training.data import ShapesWorldDataset
from training.losses import GLIPv2Loss
from training.train import config_from_args, train
from training.vocab import shapes_vocabularies


@pytest.fixture(scope="module")
def vocabularies(tokenizer):
    return shapes_vocabularies(0, tokenizer, scan=300)


@pytest.fixture()
def mt_model(small_cfg, vocabularies):
    torch.manual_seed(0)
    answers, tokens, _ = vocabularies
    return build_model(small_cfg.replace(vqa_answers=answers, caption_tokens=tokens)).eval()


OBJECT_PROMPT = "circle. square. triangle. star. hexagon. cross."


@pytest.fixture()
def objects_model(small_cfg, vocabularies):
    """A captioner whose decoder also reads 5 object tokens from the detector."""
    torch.manual_seed(0)
    _, tokens, _ = vocabularies
    return build_model(small_cfg.replace(caption_tokens=tokens, caption_objects=5,
                                         caption_object_prompt=OBJECT_PROMPT)).eval()


def test_vocabularies_cover_the_shapes_world(vocabularies, tokenizer):
    answers, tokens, words = vocabularies
    assert {"yes", "no", "red", "circle", "0", "1"} <= set(answers)
    assert answers[0] in ("yes", "no", "1")  # most frequent first
    pieces = {tokenizer.id_to_token(i) for i in tokens}
    assert {"[CLS]", "[SEP]", "[UNK]", "red", "circle", "left", "of", "he", "##xa", "##gon"} <= pieces
    # whole words only: "hexagon" is three pieces, none of them a caption word
    assert {"red", "circle", "hexagon", "hexagons", "left", "of", ","} <= set(words)
    assert not {"he", "hexa", "##xa", "[CLS]", "[SEP]"} & set(words)


def test_vqa_head_ignores_padding(mt_model, tokenizer):
    """A question padded with extra masked tokens gets the same answer logits."""
    ids = torch.from_numpy(tokenizer.encode("what color is the star?").ids)[None]
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        text = mt_model.encode_text(ids, torch.ones_like(ids))
        a = mt_model.vqa(images, text, torch.ones_like(ids))
        padded = torch.cat([text, torch.randn(1, 5, text.shape[-1])], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
        b = mt_model.vqa(images, padded, mask)
    assert a.shape == (1, len(mt_model.cfg.vqa_answers))
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("which", ["mt_model", "objects_model"])
def test_cached_decoding_equals_teacher_forcing(which, request):
    mt_model = request.getfixturevalue(which)
    dec = mt_model.caption_decoder
    images = torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8)
    tokens = torch.randint(0, len(mt_model.cfg.caption_tokens), (3, 9))
    tokens[:, 0] = mt_model.cfg.caption_start_index
    with torch.no_grad():
        feats = mt_model.visual(images)
        memory = mt_model.caption_memory(images, feats, mt_model.appearance(images, feats))
        full = dec(memory, tokens).log_softmax(-1)
        logprobs, past_k, past_v, cross_k, cross_v = mt_model.caption_start(images)
        assert torch.allclose(logprobs, full[:, 0], atol=1e-5)
        for t in range(1, 9):
            logprobs, past_k, past_v = dec.step(tokens[:, t], cross_k, cross_v, past_k, past_v)
            assert past_k.shape[3] == t + 1
            assert torch.allclose(logprobs, full[:, t], atol=1e-5), t


@dataclass
class MarkovEngine:
    """A toy CaptionEngine: next-token log-probabilities depend only on the last token
    (table[last]); caches carry the last token so rows can be checked after reordering."""

    table: np.ndarray  # [V, V] log-probabilities
    first: np.ndarray  # [V]

    def start(self, images):
        n = images.shape[0]
        past = np.zeros((n, 1, 1, 1, 1), np.float32)
        return np.tile(self.first, (n, 1)), past, past, np.zeros((n, 1, 1, 1, 1), np.float32), past

    def step(self, tokens, past_k, past_v, cross_k, cross_v):
        grow = np.concatenate([past_k, tokens.reshape(-1, 1, 1, 1, 1).astype(np.float32)], axis=3)
        return self.table[tokens], grow, grow


def _toy() -> MarkovEngine:
    # tokens: 0 = end, 1 = "a", 2 = "b", 3 = "c". Greedy takes "a" (0.6) then is stuck with
    # a 0.5/0.5 split; "b" (0.4) leads to a sure end: beam search finds [b] with p 0.4 > 0.3.
    lp = np.log(np.full((4, 4), 1e-9))
    first = np.log(np.array([1e-9, 0.6, 0.4, 1e-9]))
    lp[1] = np.log([0.5, 1e-9, 1e-9, 0.5])
    lp[2] = np.log([1.0, 1e-9, 1e-9, 1e-9])
    lp[3] = np.log([1.0, 1e-9, 1e-9, 1e-9])
    return MarkovEngine(lp, first)


def test_beam_search_finds_what_greedy_misses():
    images = np.zeros((2, 3, 4, 4), np.uint8)
    greedy = beam_search(_toy(), images, end_index=0, beam_size=1, length_penalty=0.0)
    beam = beam_search(_toy(), images, end_index=0, beam_size=2, length_penalty=0.0)
    assert [h.tokens for h in greedy] == [[1], [1]]  # "a", then end (0.5) over "c" (0.5): first wins
    assert greedy[0].logprob == pytest.approx(np.log(0.3))
    assert [h.tokens for h in beam] == [[2], [2]]
    assert beam[0].logprob == pytest.approx(np.log(0.4))


def test_beam_search_length_limits_per_row():
    table = np.full((4, 4), 0.3)
    table[:, 0] = 1e-12  # an end is never among the best candidates: only the limit stops a row
    table[1, 1] = 0.9
    first = np.array([1e-12, 0.8, 0.1, 0.1])
    engine = MarkovEngine(np.log(table / table.sum(1, keepdims=True)), np.log(first))
    hyps = beam_search(engine, np.zeros((3, 3, 4, 4), np.uint8), 0, beam_size=2, max_len=[2, 5, 1])
    assert [h.tokens for h in hyps] == [[1, 1], [1] * 5, [1]]
    with pytest.raises(ValueError):
        beam_search(engine, np.zeros((1, 3, 4, 4), np.uint8), 0, beam_size=9)


def test_batched_captions_equal_one_at_a_time(mt_model):
    cap = TorchUnderstanding(mt_model).captioner
    images = [np.random.default_rng(i).integers(0, 256, (100 + 20 * i, 140, 3), dtype=np.uint8) for i in range(4)]
    for beam in (1, 3):
        together = [c.text for c in cap.caption(images, beam, max_len=[6, 3, 6, 4])]
        alone = [cap.caption([im], beam, max_len=m)[0].text for im, m in zip(images, [6, 3, 6, 4])]
        assert together == alone


def test_caption_pipeline_follows_the_caption_words(mt_model, vocabularies):
    """TorchUnderstanding (and so evaluation and export.verify) decodes in the model's
    caption words: take away a word the untrained decoder ends its captions with, and its
    captions go without it."""
    images = [np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8) for i in range(3)]
    free = [c.text for c in TorchUnderstanding(mt_model).captioner.caption(images, 2, max_len=12)]
    gone = free[0].split()[-1]
    words = tuple(w for w in vocabularies[2] if w != gone)
    worded = build_model(mt_model.cfg.replace(caption_words=words)).eval()
    worded.load_state_dict(mt_model.state_dict())
    for c in TorchUnderstanding(worded).captioner.caption(images, 2, max_len=12):
        assert set(c.text.split()) <= set(words), c.text


def test_vqa_pipeline_ranks_answers(mt_model):
    vqa = TorchUnderstanding(mt_model).vqa
    images = [np.zeros((64, 64, 3), np.uint8)] * 2
    out = vqa.answer(images, ["how many circles are there?", "is there a red square?"], top_k=4)
    assert len(out) == 2 and len(out[0].top) == 4
    assert out[0].answer == out[0].top[0][0]
    assert [s for _, s in out[0].top] == sorted((s for _, s in out[0].top), reverse=True)


def test_collator_builds_vqa_and_caption_targets(tokenizer, vocabularies):
    answers, tokens, _ = vocabularies
    ds = ShapesWorldDataset(0, 100, understanding=True)
    samples = [ds[i] for i in range(4)]
    batch = Collator(tokenizer, (128, 128), answers=answers, caption_tokens=tokens)(samples, step_seed=3)
    index = {a: i for i, a in enumerate(answers)}
    for i, s in enumerate(samples):
        assert batch.answer_scores[i].tolist() == [float(k == index[s.answers[0]]) for k in range(len(answers))]
        ids = [tokens[j] for j in batch.caption_in[i].tolist()]
        assert ids[0] == tokenizer.cls_id
        n = int((batch.caption_out[i] >= 0).sum())
        assert tokens[batch.caption_out[i, n - 1]] == tokenizer.sep_id
        text = tokenizer.decode([tokens[j] for j in batch.caption_out[i, : n - 1].tolist()])
        assert text in [c.lower() for c in s.captions]
        assert batch.question_mask[i].sum() == len(tokenizer.encode(s.question).ids)


SMALL = ["--model", "image_hw=[128,128]", "--workers", "0", "--threads", "2", "--batch-size", "4",
         "--warmup-steps", "2", "--log-every", "1", "--save-every", "1000"]


def test_multitask_training_from_a_detection_checkpoint(tmp_path):
    det = tmp_path / "det"
    train(config_from_args([*SMALL, "--out-dir", str(det), "--max-steps", "2"]))
    ckpt = det / "checkpoints" / "step_00000002.pt"
    mt = tmp_path / "mt"
    # Another seed: ignoring --init-from would leave randomly initialised weights unlike det's.
    cfg = config_from_args([*SMALL, "--out-dir", str(mt), "--max-steps", "4", "--loss-vqa", "1",
                            "--loss-caption", "1", "--init-from", str(ckpt), "--seed", "1"])
    train(cfg)
    records = [json.loads(line) for line in (mt / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(np.isfinite(r["vqa"]) and np.isfinite(r["caption"]) for r in train_records)
    assert train_records[0]["vqa"] > 0 and train_records[0]["caption"] > 0
    assert all(np.isfinite(r["objectness"]) and r["objectness"] > 0 for r in train_records)
    # 4 steps of 4 questions: about one in three asks for an extreme, so some step has one.
    assert all(np.isfinite(r["extreme_gate"]) for r in train_records)
    assert any(r["extreme_gate"] > 0 for r in train_records)
    saved = torch.load(mt / "checkpoints" / "step_00000004.pt", weights_only=False)
    assert saved["model_config"]["vqa_answers"] and saved["model_config"]["caption_tokens"]
    # The detection weights came from the checkpoint: 4 Adam steps of lr <= 2e-3 move each by
    # at most ~1e-2, while another seed's random initialisation differs by far more.
    # (BatchNorm running statistics are not weights: they follow the new batches.)
    start = torch.load(ckpt, weights_only=False)["model"]
    moved = {k: (saved["model"][k] - v).abs().max().item() for k, v in start.items()
             if v.is_floating_point() and ".running_" not in k}
    assert len(moved) > 50 and max(moved.values()) < 0.02, max(moved.items(), key=lambda kv: kv[1])


def test_init_from_refuses_another_model(tmp_path, small_cfg):
    det = tmp_path / "det"
    train(config_from_args([*SMALL, "--out-dir", str(det), "--max-steps", "1"]))
    other = build_model(small_cfg.replace(fusion_layers=1))
    with pytest.raises(CheckpointError, match="another model"):
        init_weights(other, other.cfg, det / "checkpoints" / "step_00000001.pt")


def test_extremes_pool_the_object_the_question_asks_for():
    """Leftmost, rightmost, topmost, bottommost, largest, smallest: each pools its object's
    appearance, background anchors further out drop out, and the question's gate picks one.
    Weights are set by hand: objectness is GELU(channel 0) - GELU(channel 1) of the anchor."""
    d, c = 8, 4
    ext = Extremes(d, c)
    with torch.no_grad():
        ext.objectness[0].weight.copy_(torch.eye(d))
        ext.objectness[0].bias.zero_()
        ext.objectness[2].weight.copy_(torch.eye(d)[:1] - torch.eye(d)[1:2])
        ext.objectness[2].bias.zero_()
        ext.gate.weight.copy_(50 * torch.eye(6, d))
        ext.gate.bias.zero_()
    # (cx, cy, sqrt area, colour) of three objects, two anchors each, and background
    # anchors at the image's edges, which must never win.
    objects = [(0.2, 0.7, 0.15, (1.0, 0.0, 0.0)), (0.5, 0.1, 0.25, (0.0, 1.0, 0.0)), (0.8, 0.5, 0.08, (0.0, 0.0, 1.0))]
    rows = []
    for cx, cy, size, colour in objects:
        rows += [(10.0, cx, cy, size, colour), (10.0, cx + 0.01, cy, size, colour)]
    # Background predicts boxes of any size: a whole-image one must not be "the largest".
    for cx, cy in ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)):
        rows.append((-6.0, cx, cy, 1.0, (0.5, 0.5, 0.5)))
    anchors = torch.zeros(1, len(rows), d)
    geometry = torch.zeros(1, len(rows), 5)
    visual = torch.zeros(1, len(rows), c + 3)
    for i, (o, cx, cy, size, colour) in enumerate(rows):
        anchors[0, i, 0 if o > 0 else 1] = abs(o)
        anchors[0, i, 2 + colour.index(max(colour)) if o > 0 else 5] = 1.0  # which object: its embedding
        geometry[0, i] = torch.tensor([cx, cy, size, size, size])
        visual[0, i, c:] = torch.tensor(colour)
    expected = {"left": 0, "right": 2, "top": 1, "bottom": 0, "largest": 1, "smallest": 2}
    for k, (name, obj) in enumerate(expected.items()):
        # Three question tokens; one of them names the extreme, and a padding token that
        # would name another must not count.
        question = torch.zeros(1, 4, d)
        question[0, 1, k] = 1.0
        question[0, 3, (k + 1) % 6] = 5.0
        with torch.no_grad():
            chosen, logits = ext(anchors, geometry, visual, question, torch.tensor([[1, 1, 1, 0]]))
        # The runner-up is 0.3 further in (0.07 smaller): exp(-20 * 0.3) (exp(-80 * 0.07)) of
        # the weight at the initial temperatures.
        assert torch.allclose(chosen[0, c:c + 3], torch.tensor(objects[obj][3]), atol=0.02), name
        # ... and its anchor embedding, for the classifier to read its shape from
        assert torch.allclose(chosen[0, c + 3 + 2:c + 3 + 6], torch.eye(4)[obj], atol=0.02), name
    assert logits.objectness.shape == (1, len(rows)) and logits.gate.shape == (1, 6)


def test_every_drawn_object_is_an_objectness_target(tokenizer, vocabularies):
    """The objectness targets are the scene's objects, whatever the prompt names."""
    answers, tokens, _ = vocabularies
    ds = ShapesWorldDataset(0, 100, grounding_fraction=0.5, understanding=True)
    samples = [ds[i] for i in range(8)]
    batch = Collator(tokenizer, (128, 256), answers=answers, caption_tokens=tokens)(samples)
    for i, s in enumerate(samples):
        scene, _ = ds.scene(i)
        scale = min(128 / s.image.shape[0], 256 / s.image.shape[1])  # letterbox to the model's input
        drawn = torch.tensor([o.box for o in scene.objects], dtype=torch.float32) * scale
        assert torch.allclose(batch.objects[i], drawn, atol=1e-3)


def test_question_extreme_names_the_object_that_answers():
    """The gate's training target: for every relation and largest/smallest question the
    generator asks, the extreme it names (by the extremes' own coordinates) is an object
    whose shape (relation) or colour (largest/smallest) is the answer; other kinds name none."""
    seen = {name: 0 for name in EXTREMES}
    for i in range(300):
        rng = np.random.default_rng([5, i])
        scene = sw.sample_scene(rng)
        if not scene.objects:
            continue
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float64)
        geometry = box_ops.box_geometry(boxes, (scene.height, scene.width))  # what the VQA head computes
        furthest = extreme_coordinates(geometry).argmax(-1)  # [6]: the object furthest each way
        for question, answer in sw.vqa_pairs(scene, rng):
            name = sw.question_extreme(question)
            relation = question.startswith("what shape is ")
            if not relation and not ("largest" in question or "smallest" in question):
                assert name is None, question
                continue
            assert name is not None, question
            seen[name] += 1
            obj = scene.objects[int(furthest[EXTREMES.index(name)])]
            assert (obj.shape if relation else obj.colour) == answer, (question, answer, name, scene)
    assert min(seen.values()) >= 10, seen


def test_gate_targets_reach_the_batch_and_the_loss(tokenizer, vocabularies):
    """Collated targets are the samples' extremes (EXTREMES order, -1 none); the gate loss is
    the cross-entropy over the questions that ask for one, and zero (with a gradient path)
    when none does."""
    answers, tokens, _ = vocabularies
    ds = ShapesWorldDataset(0, 200, grounding_fraction=0.5, understanding=True)
    samples = [ds[i] for i in range(40)]
    batch = Collator(tokenizer, (128, 128), answers=answers, caption_tokens=tokens)(samples)
    expected = [-1 if s.question_extreme is None else EXTREMES.index(s.question_extreme) for s in samples]
    assert batch.question_extremes.tolist() == expected
    assert -1 < max(expected) and min(expected) == -1
    loss_fn = GLIPv2Loss(LossConfig(), [])
    logits = torch.randn(len(samples), 6, requires_grad=True)
    asked = batch.question_extremes >= 0
    want = torch.nn.functional.cross_entropy(logits[asked], batch.question_extremes[asked])
    assert torch.allclose(loss_fn.extreme_gate(logits, batch.question_extremes), want)
    none = loss_fn.extreme_gate(logits, torch.full((len(samples),), -1))
    none.backward()
    assert none.item() == 0.0 and logits.grad is not None


def test_stage_two_starts_from_a_checkpoint_without_extremes(tmp_path):
    """Stage 1 checkpoints of before the extremes and the count thresholds (absent = off)
    still start stage 2."""
    det = tmp_path / "det"
    train(config_from_args([*SMALL, "--out-dir", str(det), "--max-steps", "1", "--model", "vqa_extremes=false",
                            "--model", "vqa_count_thresholds=[]"]))
    mt = tmp_path / "mt"
    train(config_from_args([*SMALL, "--out-dir", str(mt), "--max-steps", "1", "--loss-vqa", "1",
                            "--init-from", str(det / "checkpoints" / "step_00000001.pt")]))
    saved = torch.load(mt / "checkpoints" / "step_00000001.pt", weights_only=False)
    assert saved["model_config"]["vqa_extremes"] and saved["model_config"]["vqa_count_thresholds"]
    assert any(k.startswith("vqa_head.extremes.") for k in saved["model"])
    assert "vqa_head.count_thresholds" in saved["model"]


def test_stage_two_sizes_its_caption_decoder_freely_after_a_stage_without_one(tmp_path):
    """A stage-1 checkpoint has no caption decoder, so stage 2 may give it other sizes
    (more layers); a checkpoint that has one keeps it the size it was trained at."""
    det = tmp_path / "det"
    train(config_from_args([*SMALL, "--out-dir", str(det), "--max-steps", "1"]))
    mt = tmp_path / "mt"
    train(config_from_args([*SMALL, "--out-dir", str(mt), "--max-steps", "1", "--loss-caption", "1",
                            "--model", "caption_layers=3", "--init-from", str(det / "checkpoints" / "step_00000001.pt")]))
    saved = mt / "checkpoints" / "step_00000001.pt"
    state = torch.load(saved, weights_only=False)
    assert state["model_config"]["caption_layers"] == 3
    assert any(k.startswith("caption_decoder.layers.2.") for k in state["model"])
    two = build_model(ModelConfig.from_dict(state["model_config"]).replace(caption_layers=2))
    with pytest.raises(CheckpointError, match="another model"):
        init_weights(two, two.cfg, saved)
    # Object tokens added to a decoder trained without them: they start fresh, the rest loads.
    objects = tmp_path / "objects"
    train(config_from_args([*SMALL, "--out-dir", str(objects), "--max-steps", "1", "--loss-caption", "1",
                            "--model", "caption_layers=3", "--model", "caption_objects=4",
                            "--model", "caption_object_prompt=circle. star.", "--init-from", str(saved)]))
    grown = torch.load(objects / "checkpoints" / "step_00000001.pt", weights_only=False)
    assert grown["model"]["caption_decoder.object_rank"].shape[1] == 4


def test_count_features_count_the_peaks_above_each_threshold(small_cfg):
    """Two objects (3x3 blobs peaking at 0.45) among 0-0.04 background peaks: the soft count
    above 0.2 reads 2 for the token that names them and 0 for one that names nothing, where
    the score mass (the only count feature before) separates them far less."""
    head = VqaHead(small_cfg.replace(vqa_answers=("0", "1", "2"), vqa_count_thresholds=(0.15, 0.2, 0.3)))
    levels = small_cfg.level_hw
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1, sum(h * w for h, w in levels), 2, generator=g) * 0.04
    h0, w0 = levels[0]
    fine = scores[0, : h0 * w0, 0].view(h0, w0)  # a view: writes land in scores
    for y, x in ((3, 3), (10, 11)):
        fine[y - 1:y + 2, x - 1:x + 2] = 0.3  # an object's neighbouring anchors are not peaks
        fine[y, x] = 0.45
    with torch.no_grad():
        named = head._counts(scores, torch.tensor([[1.0, 0.0]]))[0]
        nothing = head._counts(scores, torch.tensor([[0.0, 1.0]]))[0]
    n = len(levels)
    at = n + 1 + (n + 2) * 1  # the 0.2 threshold's features: per level, summed, most
    assert named[at].item() == pytest.approx(2.0, abs=0.05) and named[at + n].item() == pytest.approx(2.0, abs=0.05)
    assert named[at + n + 1].item() == pytest.approx(2.0, abs=0.05)
    assert nothing[at:at + n + 2].abs().max().item() < 0.05
    assert head.classifier[0].in_features == 2 * small_cfg.vqa_dim + small_cfg.fpn_channels + 3 + len(named) + (
        small_cfg.fpn_channels + 3 + small_cfg.vqa_dim)


def _quadrants(size: int = 128) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """An image of four flat quadrants (top-left, top-right, bottom-left, bottom-right)."""
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 40)]
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    half = size // 2
    for i, rgb in enumerate(colours):
        r, c = divmod(i, 2)
        image[0, :, r * half:(r + 1) * half, c * half:(c + 1) * half] = torch.tensor(rgb)[:, None, None]
    return image, colours


def test_object_tokens_are_the_detectors_best_anchors_with_their_centre_colour(objects_model):
    """Each object token is one of the K anchors the detector scores best for the object
    prompt, best first, and carries the input's colour at its box centre."""
    model, cfg = objects_model, objects_model.cfg
    image, colours = _quadrants(cfg.image_hw[0])
    with torch.no_grad():
        feats = model.visual(image)
        looks = model.appearance(image, feats)
        inputs = model.caption_objects(image, feats, looks)[0]  # [K, n]
        prompt = model.caption_decoder.object_prompt
        out = model.detect_features(feats, prompt, torch.ones(prompt.shape[:2], dtype=torch.int64),
                                    model.cell_colours(image))
    assert inputs.shape == (cfg.caption_objects, object_input_size(cfg))
    geometry_at = cfg.proj_dim + cfg.fpn_channels + 3
    score = inputs[:, geometry_at + 5]
    best = (out.logits.amax(-1).sigmoid() * out.centerness.sigmoid())[0].topk(cfg.caption_objects)
    assert torch.allclose(score, best.values, atol=1e-6)
    # each token's embedding and box are its own anchor's
    assert torch.allclose(inputs[:, :cfg.proj_dim], out.head.regions[0, best.indices], atol=1e-5)
    boxes = box_ops.box_geometry(out.boxes[0, best.indices], cfg.image_hw)
    assert torch.allclose(inputs[:, geometry_at:geometry_at + 5], boxes, atol=1e-5)
    centre = inputs[:, -3:]
    normalised = model.normalize(torch.tensor(colours, dtype=torch.float32)[:, :, None, None])[:, :, 0, 0]
    checked = 0
    for (cx, cy), rgb in zip(inputs[:, geometry_at:geometry_at + 2].tolist(), centre):
        if min(abs(cx - 0.5), abs(cy - 0.5)) < 0.05:
            continue  # a centre on a quadrant border: its 4-pixel cell may mix two colours
        checked += 1
        assert torch.allclose(rgb, normalised[2 * int(cy > 0.5) + int(cx > 0.5)], atol=1e-4), (cx, cy)
    assert checked >= 2


def test_object_tokens_take_no_gradient_from_the_caption_loss_into_the_detector(objects_model):
    """The caption loss trains the object projection but not the detector whose outputs the
    object tokens are (and the prompt's features are stored with the weights)."""
    model = objects_model.train()
    dec = model.caption_decoder
    assert "caption_decoder.object_prompt" in model.state_dict()
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    tokens = torch.randint(0, len(model.cfg.caption_tokens), (2, 6))
    feats = model.visual(images)
    memory = model.caption_memory(images, feats, model.appearance(images, feats))
    assert memory.shape[1] == model.cfg.caption_memory_length == model.cfg.caption_grid_length + 5
    dec(memory, tokens).logsumexp(-1).sum().backward()
    assert dec.object_proj.weight.grad.abs().sum() > 0
    assert dec.object_rank.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.head.parameters())


def test_object_tokens_need_a_prompt_and_enough_anchors(small_cfg):
    with pytest.raises(ValueError, match="caption_object_prompt"):
        small_cfg.replace(caption_objects=4)
    anchors = sum(h * w for h, w in small_cfg.level_hw)
    small_cfg.replace(caption_objects=anchors, caption_object_prompt="star.")
    with pytest.raises(ValueError, match="number of anchors"):
        small_cfg.replace(caption_objects=anchors + 1, caption_object_prompt="star.")


def test_object_tokens_export_to_onnx_with_parity(objects_model, tmp_path):
    """The caption_start graph with the detector pass inside: TensorRT's ops only, and ONNX
    Runtime's first step and cross-attention memory equal PyTorch's, at two batch sizes."""
    from export.onnx_export import export_onnx
    from export.trt_ops import unsupported_ops
    from glipv2.runtime.onnx import OrtEngine

    files = export_onnx(objects_model, tmp_path, top_k=20)
    assert unsupported_ops(files["caption_start"]) == {}
    engine = OrtEngine(tmp_path, threads=2).captioner
    quadrants, _ = _quadrants()
    images = torch.cat([quadrants, torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)])
    for batch in (images[:1], images):
        with torch.no_grad():
            expected = objects_model.caption_start(batch)
        got = engine.start(batch.numpy())
        assert got[3].shape[3] == objects_model.cfg.caption_memory_length
        for name, e, g in zip(("logprobs", "present_k", "present_v", "cross_k", "cross_v"), expected, got):
            assert np.abs(e.numpy() - g).max() <= 1e-3, name
