"""Retrieval metrics (pipeline.tools.retrieval) on literal embeddings whose right answers are worked out by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.testing.shards import COLORS, SHAPES, Scene
from pipeline.tools import retrieval

RED_CIRCLE = Scene("circle", "red", "blue")
RED_SQUARE = Scene("square", "red", "blue")
GREEN_CIRCLE = Scene("circle", "green", "blue")


def unit(*rows: list[float]) -> np.ndarray:
    array = np.array(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_precision_at_k_counts_matching_images_in_the_top_k_per_caption():
    images = unit([1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9])
    scenes = [RED_CIRCLE, RED_CIRCLE, RED_SQUARE, RED_SQUARE, RED_SQUARE]
    queries = unit([1, 0], [0, 1])
    precision = retrieval.precision_at_k([RED_CIRCLE, RED_SQUARE], queries, images, scenes, k=2, min_relevant=2)
    # red circle: top 2 are images 0 and 1, both circles; red square: images 3 and 4, both squares
    assert precision == {RED_CIRCLE.caption: 1.0, RED_SQUARE.caption: 1.0}
    # with k=3 the circle query's third hit is image 2, a square; the square query's is image 2 too
    precision = retrieval.precision_at_k([RED_CIRCLE, RED_SQUARE], queries, images, scenes, k=3, min_relevant=2)
    assert precision[RED_CIRCLE.caption] == pytest.approx(2 / 3)
    assert precision[RED_SQUARE.caption] == pytest.approx(1.0)


def test_precision_at_k_leaves_out_captions_with_too_few_images():
    images = unit([1, 0], [0, 1])
    scenes = [RED_CIRCLE, RED_SQUARE]
    precision = retrieval.precision_at_k(
        [RED_CIRCLE, GREEN_CIRCLE], unit([1, 0], [1, 0]), images, scenes, k=1, min_relevant=1
    )
    assert precision == {RED_CIRCLE.caption: 1.0}  # no green circle image: not scored
    assert retrieval.precision_at_k([RED_CIRCLE], unit([1, 0]), images, scenes, k=1, min_relevant=2) == {}


def test_a_wrong_top_hit_lowers_precision():
    images = unit([1, 0], [0.95, 0.05], [0.5, 0.5])
    scenes = [RED_SQUARE, RED_CIRCLE, RED_CIRCLE]
    precision = retrieval.precision_at_k([RED_CIRCLE], unit([1, 0]), images, scenes, k=2, min_relevant=2)
    assert precision == {RED_CIRCLE.caption: 0.5}


def test_nearest_neighbour_excludes_the_image_itself():
    # 0 and 1 are each other's neighbours (same shape and colour); 2's nearest is 3 (another colour)
    images = unit([1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 0.2, 0.9])
    scenes = [RED_CIRCLE, Scene("circle", "red", "white"), RED_SQUARE, Scene("square", "green", "blue")]
    assert retrieval.nn_same_attributes(images, scenes) == pytest.approx(0.5)
    assert retrieval.nn_same_attributes(images, scenes, attributes=("shape",)) == pytest.approx(1.0)


def test_clip_score_auc_is_one_when_every_match_outscores_every_mismatch():
    images = unit([1, 0], [0, 1], [1, 0.1])
    captions = unit([1, 0], [0, 1], [1, 0])  # the caption embedding of each image's own scene
    scenes = [RED_CIRCLE, RED_SQUARE, RED_CIRCLE]
    assert retrieval.clip_score_auc(images, captions, scenes) == pytest.approx(1.0)


def test_clip_score_auc_counts_pairs_and_ties():
    images = unit([1, 0], [0, 1])
    captions = unit([1, 0], [1, 0])
    scenes = [RED_CIRCLE, RED_SQUARE]
    # matches score [1, 0], mismatches [1, 0]: of the four (match, mismatch) pairs one wins, one loses, two tie
    assert retrieval.clip_score_auc(images, captions, scenes) == pytest.approx(0.5)


def test_clip_score_auc_ignores_pairs_with_the_same_caption():
    images = unit([1, 0], [0.6, 0.8], [0, 1])
    captions = unit([1, 0], [1, 0], [0, 1])
    scenes = [RED_CIRCLE, RED_CIRCLE, RED_SQUARE]
    # image 0 with image 1's caption (the same caption) scores 1.0, above image 1's match (0.6): not a mismatch
    # positives [1, .6, 1]; mismatches: (0,sq) 0, (1,sq) .8, (2,circ) 0, (2,circ) 0 -> .6 < .8 is the one loss
    assert retrieval.clip_score_auc(images, captions, scenes) == pytest.approx(11 / 12)


def test_paraphrase_hit_rate_checks_the_top_k_for_a_matching_scene():
    captions = unit([1, 0], [0, 1], [0.7, 0.7])
    scenes = [RED_CIRCLE, RED_SQUARE, GREEN_CIRCLE]
    queries = unit([1, 0.05], [0, 1], [0.1, 1])
    query_scenes = [RED_CIRCLE, GREEN_CIRCLE, GREEN_CIRCLE]
    # query 0 hits red circle at rank 1; query 1 ranks red square then green circle; query 2 the same
    assert retrieval.paraphrase_hit_rate(queries, query_scenes, captions, scenes, k=1) == pytest.approx(1 / 3)
    assert retrieval.paraphrase_hit_rate(queries, query_scenes, captions, scenes, k=2) == pytest.approx(1.0)


def test_mismatched_lengths_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="image_embeddings: 2 embeddings for 3 scenes"):
        retrieval.nn_same_attributes(unit([1, 0], [0, 1]), [RED_CIRCLE] * 3)
    with pytest.raises(ValueError, match="caption_embeddings"):
        retrieval.clip_score_auc(unit([1, 0], [0, 1]), unit([1, 0]), [RED_CIRCLE, RED_SQUARE])
    with pytest.raises(ValueError, match="2-d"):
        retrieval.nn_same_attributes(np.zeros(3), [RED_CIRCLE] * 3)


def test_paraphrases_reword_every_part_of_the_caption():
    scene = Scene("star", "red", "blue")
    queries = list(retrieval.paraphrases(scene))
    assert len(queries) == len(set(queries)) >= 4
    assert scene.caption not in queries
    assert any("crimson" in q for q in queries) and any("navy" in q for q in queries)
    for shape in SHAPES:
        for color in COLORS:
            assert all(q for q in retrieval.paraphrases(Scene(shape, color, "white" if color != "white" else "black")))


def test_retrieval_scenes_give_many_captions_enough_images():
    scenes = retrieval.retrieval_scenes(random.Random(3), combos=20, per_combo=12, others=50)
    assert len(scenes) == 290
    counts = {scene: scenes.count(scene) for scene in set(scenes)}
    assert sum(count >= 12 for count in counts.values()) >= 20
    assert all(scene.color != scene.background for scene in scenes)
    assert scenes == retrieval.retrieval_scenes(random.Random(3), combos=20, per_combo=12, others=50)
