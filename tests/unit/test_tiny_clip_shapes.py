"""The committed tiny CLIP (models/tiny-clip-shapes, trained by pipeline.tools.train_clip) finds the shapes it
was trained on, loaded the way production loads a CLIP checkpoint (pipeline.embedders.ImageTextEmbedder),
on images it never saw."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.testing.shards import Scene, random_scene
from pipeline.tools import retrieval

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-clip-shapes"


@pytest.fixture(scope="module")
def embedded():
    from pipeline.embedders import ImageTextEmbedder
    from pipeline.tools.train_clip import draw_image

    # seeds far from training's and from the held-out set training.json reports on
    rng = random.Random(9_300_000)
    scenes = [random_scene(rng) for _ in range(100)]
    images = [draw_image(scene, random.Random(f"unit-{i}"))[0] for i, scene in enumerate(scenes)]
    embedder = ImageTextEmbedder(MODEL)
    image_vectors = embedder.embed_images(images)
    unique = sorted(set(scenes), key=lambda s: s.caption)
    text_vectors = embedder.embed_texts([s.caption for s in unique])
    return embedder, scenes, unique, image_vectors, text_vectors


def test_a_caption_finds_its_own_scene_first(embedded):
    _, scenes, unique, image_vectors, text_vectors = embedded
    # precision@1 over every caption present: chance is about 1/len(unique) (~1 in 80 here)
    precision = retrieval.precision_at_k(unique, text_vectors, image_vectors, scenes, k=1, min_relevant=1)
    assert len(precision) == len(unique)
    assert np.mean(list(precision.values())) >= 0.85


def test_clip_score_ranks_own_captions_above_others(embedded):
    embedder, scenes, unique, image_vectors, text_vectors = embedded
    captions = text_vectors[[unique.index(s) for s in scenes]]
    assert retrieval.clip_score_auc(image_vectors, captions, scenes) >= 0.95  # chance: 0.5
    # one attribute changed is the hard case: the true caption still wins for nearly every image
    wrong_shape = [Scene("star" if s.shape != "star" else "circle", s.color, s.background) for s in scenes]
    near_miss = embedder.embed_texts([s.caption for s in wrong_shape])
    assert (
        np.mean(np.einsum("nd,nd->n", image_vectors, captions) > np.einsum("nd,nd->n", image_vectors, near_miss)) >= 0.9
    )


def test_training_record_says_how_it_was_made():
    record = json.loads((MODEL / "training.json").read_text())
    assert record["weights_sha256"]
    assert record["settings"]["seed"] == 0
    assert record["held_out"]["images"] >= 500
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 10 * 1024 * 1024
