"""Retrieval metrics on the generated shapes: does a search find what the ground truth says it should?

Pure numpy over normalised embeddings and the ground-truth `Scene` of every image, so the same
functions score a model straight after training (`pipeline.tools.train_clip`) and a whole run
through the pipeline and the index (`llava-pipeline eval`):

- `precision_at_k`: text -> image, per (colour, shape, background) caption with enough matching images;
- `nn_same_attributes`: image -> image, the nearest other image shares the shape and colour;
- `clip_score_auc`: image-caption scores of matching pairs above those of mismatched pairs;
- `paraphrase_hit_rate`: reworded queries (`paraphrases`) find a matching image in the top k.

`retrieval_scenes` draws a held-out set in which many captions have enough images to be scored.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np

from pipeline.testing.shards import COLORS, SHAPES, Scene


def _matrix(vectors, name: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array of embeddings, got shape {array.shape}")
    return array


def _check_rows(vectors: np.ndarray, scenes: Sequence[Scene], name: str) -> None:
    if len(vectors) != len(scenes):
        raise ValueError(f"{name}: {len(vectors)} embeddings for {len(scenes)} scenes")


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores in each row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def precision_at_k(
    query_scenes: Sequence[Scene],
    query_embeddings,
    image_embeddings,
    image_scenes: Sequence[Scene],
    *,
    k: int = 10,
    min_relevant: int = 10,
) -> dict[str, float]:
    """Text -> image: for each query scene with at least `min_relevant` matching images (same colour,
    shape and background), the fraction of its top `k` images that match, keyed by its caption.
    Queries with fewer matching images are left out: their precision could not reach 1."""
    queries = _matrix(query_embeddings, "query_embeddings")
    images = _matrix(image_embeddings, "image_embeddings")
    _check_rows(queries, query_scenes, "query_embeddings")
    _check_rows(images, image_scenes, "image_embeddings")
    counts: dict[Scene, int] = defaultdict(int)
    for scene in image_scenes:
        counts[scene] += 1
    scored = [i for i, scene in enumerate(query_scenes) if counts[scene] >= min_relevant]
    if not scored:
        return {}
    top = _top_k(queries[scored] @ images.T, k)
    truth = np.array([[image_scenes[j] == query_scenes[i] for j in row] for i, row in zip(scored, top)])
    return {query_scenes[i].caption: float(hits.mean()) for i, hits in zip(scored, truth)}


def nn_same_attributes(
    image_embeddings, scenes: Sequence[Scene], attributes: Sequence[str] = ("shape", "color")
) -> float:
    """Image -> image: the fraction of images whose nearest other image has the same `attributes`."""
    images = _matrix(image_embeddings, "image_embeddings")
    _check_rows(images, scenes, "image_embeddings")
    if len(images) < 2:
        raise ValueError("nn_same_attributes needs at least two images")
    scores = images @ images.T
    np.fill_diagonal(scores, -np.inf)  # an image is not its own neighbour
    nearest = _top_k(scores, 1)[:, 0]
    same = [all(getattr(scenes[i], a) == getattr(scenes[j], a) for a in attributes) for i, j in enumerate(nearest)]
    return float(np.mean(same))


def clip_score_auc(image_embeddings, caption_embeddings, scenes: Sequence[Scene]) -> float:
    """The probability that an image scores higher with its own caption than an image with another
    image's caption (the area under the ROC curve of the score as a match/mismatch classifier, ties
    counting half). `caption_embeddings[i]` embeds `scenes[i].caption`. Every image with its own caption
    is a match; every image with the caption of an image of another scene is a mismatch (pairs with the
    same caption are neither). One threshold over all pairs, as a filter on `clip_score` would use."""
    images = _matrix(image_embeddings, "image_embeddings")
    captions = _matrix(caption_embeddings, "caption_embeddings")
    _check_rows(images, scenes, "image_embeddings")
    _check_rows(captions, scenes, "caption_embeddings")
    scores = images @ captions.T
    codes = np.unique([s.caption for s in scenes], return_inverse=True)[1]
    different = codes[:, None] != codes[None, :]
    positives = np.diag(scores)
    negatives = scores[different]
    if len(negatives) == 0:
        raise ValueError("clip_score_auc needs images of at least two scenes")
    return auc(positives, negatives)


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Mann-Whitney U over ranks: P(positive > negative) + P(tie) / 2."""
    values = np.concatenate([positives, negatives]).astype(np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    # ties share their mean rank
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if len(unique) < len(values):
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paraphrase_hit_rate(
    query_embeddings,
    query_scenes: Sequence[Scene],
    caption_embeddings,
    image_scenes: Sequence[Scene],
    *,
    k: int = 10,
) -> float:
    """The fraction of queries whose top `k` images (ranked by their caption embeddings) include one of
    the query's scene."""
    queries = _matrix(query_embeddings, "query_embeddings")
    captions = _matrix(caption_embeddings, "caption_embeddings")
    _check_rows(queries, query_scenes, "query_embeddings")
    _check_rows(captions, image_scenes, "caption_embeddings")
    if len(queries) == 0:
        raise ValueError("paraphrase_hit_rate needs at least one query")
    top = _top_k(queries @ captions.T, k)
    return float(np.mean([any(image_scenes[j] == scene for j in row) for scene, row in zip(query_scenes, top)]))


# Words a person might use instead of the captions' own.
_COLOR_WORDS = {
    "red": ["crimson", "scarlet", "red"],
    "green": ["emerald", "green", "leaf-green"],
    "blue": ["navy", "azure", "blue"],
    "yellow": ["golden", "lemon", "yellow"],
    "purple": ["violet", "lilac", "purple"],
    "orange": ["tangerine", "amber", "orange"],
    "white": ["snow-white", "ivory", "white"],
    "black": ["jet-black", "ebony", "black"],
}
_SHAPE_WORDS = {
    "circle": ["disc", "round dot", "circle"],
    "square": ["box", "square block", "square"],
    "triangle": ["triangular shape", "pyramid shape", "triangle"],
    "star": ["five-pointed star", "star shape", "star"],
}
_TEMPLATES = [
    "a {color} {shape} over a {background} backdrop",
    "{color} {shape} set against {background}",
    "picture of a {shape} coloured {color} with a {background} surround",
    "a {background} field with a {color} {shape} in it",
]
assert set(_COLOR_WORDS) == set(COLORS) and set(_SHAPE_WORDS) == set(SHAPES)


def paraphrases(scene: Scene) -> Iterator[str]:
    """Queries that say what the scene's caption says in other words and word orders: one per template,
    the synonyms rotating so that every scene gets a mix."""
    for index, template in enumerate(_TEMPLATES):
        yield template.format(
            color=_COLOR_WORDS[scene.color][index % 3],
            shape=_SHAPE_WORDS[scene.shape][(index + 1) % 3],
            background=_COLOR_WORDS[scene.background][(index + 2) % 3],
        )


def retrieval_scenes(rng: random.Random, *, combos: int = 56, per_combo: int = 12, others: int = 100) -> list[Scene]:
    """A held-out set in which `combos` distinct scenes have `per_combo` images each (so text -> image
    precision@10 can be scored on them), plus `others` random scenes, shuffled."""
    every = sorted(
        (
            Scene(shape, color, background)
            for shape in SHAPES
            for color in COLORS
            for background in COLORS
            if color != background
        ),
        key=lambda s: (s.shape, s.color, s.background),
    )
    chosen = rng.sample(every, combos)
    scenes = [scene for scene in chosen for _ in range(per_combo)]
    for _ in range(others):
        color, background = rng.sample(sorted(COLORS), 2)
        scenes.append(Scene(rng.choice(SHAPES), color, background))
    rng.shuffle(scenes)
    return scenes
