"""Searching an index built by `pipeline.index`: by text (through CLIP's text tower to images, through the
caption model to captions, by full text, or hybrid), or by an image (similar images).

    index = open_index("s3://bucket/captions/_index")
    for hit in index.search("a red star on a blue background", mode="image", k=10):
        print(hit.score, hit.key, hit.caption)
    index.search(image="query.jpg")                       # similar images

The query models are the ones the index's vectors came from: their sources are recorded on the index's vector
columns (the job's `embed` models), fetched once like any checkpoint (`pipeline.model_source`). Pass
`image_text_model=` / `text_model=` to load the same model from elsewhere (a moved directory): its dimension is
still checked against the index's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import StorageConfig
from pipeline.embedders import EmbeddingSpace
from pipeline.errors import ConfigError
from pipeline.index import (
    DISTANCE,
    SAMPLES_TABLE,
    TEXT_COLUMNS,
    IndexLocation,
    describe_lance_error,
    index_spaces,
    open_table,
)

Mode = Literal["image", "caption", "text", "hybrid"]
MODES: tuple[str, ...] = ("image", "caption", "text", "hybrid")

# IVF_PQ search settings: partitions probed, and candidates re-ranked by their exact distance per hit wanted.
# Measured (docs/benchmarks.md, "Search index"): recall@10 against exact search at these values.
NPROBES = 20
REFINE_FACTOR = 50
# Decoding a query image: the same pixel limit a job applies by default (`decode.max_image_pixels`).
_QUERY_MAX_PIXELS = 64_000_000
_SHOWN = ["key", "shard", "shard_name", "caption", "tags", "clip_score", "image_sha256", "metadata"]


class SearchError(ConfigError):
    """A search that cannot be answered as asked: no index, a bad query, a mode the index cannot serve."""


@dataclass(frozen=True)
class Hit:
    key: str
    shard: str
    shard_name: str
    caption: str | None
    tags: str | None
    score: float  # higher is better: cosine similarity for vector modes, BM25 for text, RRF for hybrid
    clip_score: float | None
    image_sha256: str | None
    metadata: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def open_index(
    url: str,
    storage: StorageConfig | None = None,
    *,
    image_text_model: str | None = None,
    text_model: str | None = None,
    model_cache_dir: str | None = None,
) -> "SearchIndex":
    """The index at `url` (a local path or `s3://` prefix), or a SearchError when there is none."""
    location = IndexLocation.of(url, storage)
    if location.is_local and not Path(location.lance_uri).is_dir():
        raise SearchError(f"no search index at {url} (build one with `llava-pipeline index JOB.yaml`)")
    try:
        samples = open_table(location.connect(), SAMPLES_TABLE)
    except ConfigError:
        raise
    except Exception as exc:
        raise SearchError(f"cannot open the index: {describe_lance_error(exc, location)}") from None
    if samples is None:
        raise SearchError(f"no search index at {url} (build one with `llava-pipeline index JOB.yaml`)")
    return SearchIndex(location, samples, image_text_model, text_model, model_cache_dir)


class SearchIndex:
    """An open index: its table, the embedding spaces it holds and, loaded on first use, the query models."""

    def __init__(self, location: IndexLocation, samples, image_text_model, text_model, model_cache_dir):
        self.location = location
        self.table = samples
        self.spaces: dict[str, EmbeddingSpace] = index_spaces(samples.schema)
        self._sources = {"image_embedding": image_text_model, "caption_embedding": text_model}
        self._cache_dir = model_cache_dir
        self._models: dict[str, object] = {}

    @property
    def url(self) -> str:
        return self.location.url

    def count(self) -> int:
        return self.table.count_rows()

    def default_mode(self) -> Mode:
        """Text queries find images (CLIP) when the index has image embeddings, else captions, else words."""
        if "image_embedding" in self.spaces:
            return "image"
        if "caption_embedding" in self.spaces:
            return "caption"
        return "text"

    def search(
        self,
        text: str | None = None,
        image: str | Path | bytes | None = None,
        mode: Mode | None = None,
        k: int = 10,
        where: str | None = None,
    ) -> list[Hit]:
        """The `k` best hits for a text or an image query (one of them), among the rows `where` (an SQL filter on
        the index's columns, e.g. `"key != 'sample-0001'"`) selects, when given.

        mode `image`: images, by the text through CLIP's text tower, or by the query image; `caption`: captions, by
        the text through the caption model; `text`: full text over captions and tags; `hybrid`: full text and the
        CLIP image vectors (caption vectors where the index has no image vectors), fused by reciprocal rank."""
        if (text is None) == (image is None):
            raise SearchError("give a text query or a query image (one of them)")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        if text is not None and not text.strip():
            raise SearchError("the text query is empty")
        mode = mode or ("image" if image is not None else self.default_mode())
        if mode not in MODES:
            raise SearchError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if image is not None:
            if mode != "image":
                raise SearchError(f"a query image searches images (mode image), not mode {mode}")
            return self._vector_search("image_embedding", self._image_vector(image), k, where)
        if mode == "image":
            return self._vector_search("image_embedding", self._text_vector("image_embedding", text), k, where)
        if mode == "caption":
            return self._vector_search("caption_embedding", self._text_vector("caption_embedding", text), k, where)
        if mode == "text":
            query = self.table.search(text, query_type="fts", fts_columns=list(TEXT_COLUMNS))
            return self._hits(self._filtered(query, where).limit(k).to_arrow(), "_score")
        return self._hybrid(text, k, where)

    # --- queries ----------------------------------------------------------------------------------------------

    @staticmethod
    def _filtered(query, where: str | None):
        return query if where is None else query.where(where, prefilter=True)

    def _vector_search(self, column: str, vector, k: int, where: str | None) -> list[Hit]:
        query = (
            self.table.search(vector, vector_column_name=column)
            .distance_type(DISTANCE)
            .nprobes(NPROBES)
            .refine_factor(REFINE_FACTOR)
        )
        return self._hits(self._filtered(query, where).limit(k).to_arrow(), "_distance")

    def _hybrid(self, text: str, k: int, where: str | None) -> list[Hit]:
        from lancedb.rerankers import RRFReranker

        column = "image_embedding" if "image_embedding" in self.spaces else "caption_embedding"
        vector = self._text_vector(column, text)
        query = (
            self.table.search(query_type="hybrid", vector_column_name=column, fts_columns=list(TEXT_COLUMNS))
            .vector(vector)
            .text(text)
            .distance_type(DISTANCE)
            .nprobes(NPROBES)
            .refine_factor(REFINE_FACTOR)
            .rerank(RRFReranker())
        )
        return self._hits(self._filtered(query, where).limit(k).to_arrow(), "_relevance_score")

    def _hits(self, table, score_column: str) -> list[Hit]:
        rows = table.select([c for c in _SHOWN if c in table.column_names] + [score_column]).to_pylist()
        hits = []
        for row in rows:
            score = row.pop(score_column)
            if score_column == "_distance":
                score = 1.0 - float(score)  # cosine distance -> cosine similarity
            hits.append(Hit(score=float(score), **{c: row.get(c) for c in _SHOWN}))
        return hits

    # --- query vectors ------------------------------------------------------------------------------------------

    def _space(self, column: str) -> EmbeddingSpace:
        space = self.spaces.get(column)
        if space is None:
            what = "image" if column == "image_embedding" else "caption"
            raise SearchError(
                f"the index at {self.url} has no {what} embeddings (its outputs were written without "
                f"embed.{'image_text_model' if what == 'image' else 'text_model'}); search it with mode "
                f"{'caption' if 'caption_embedding' in self.spaces and what == 'image' else 'text'}"
            )
        return space

    def query_model(self, column: str):
        """The model that embeds queries for `column` (an `ImageTextEmbedder` for `image_embedding`, a
        `TextEmbedder` for `caption_embedding`), loaded on first use and checked against the index's dimension."""
        if column in self._models:
            return self._models[column]
        space = self._space(column)
        from pipeline.embedders import ImageTextEmbedder, TextEmbedder
        from pipeline.model_source import ModelSource, local_model_dir, node_cache_dir

        source = self._sources[column] or space.model
        directory = local_model_dir(
            ModelSource(
                source=source, revision=None, storage=self.location.storage, cache_dir=node_cache_dir(self._cache_dir)
            )
        )
        model = ImageTextEmbedder(directory) if column == "image_embedding" else TextEmbedder(directory)
        if model.dimension != space.dimension:
            raise SearchError(
                f"the query model {source} makes {model.dimension}-dimensional vectors, the index's {column} holds "
                f"{space.dimension}-dimensional vectors from {space.model}"
            )
        self._models[column] = model
        return model

    def _text_vector(self, column: str, text: str):
        model = self.query_model(column)
        vectors = model.embed_texts([text]) if column == "image_embedding" else model.embed([text])
        return vectors[0]

    def _image_vector(self, image: str | Path | bytes):
        from pipeline.images import ImageDecodeError, decode_image

        if isinstance(image, bytes):
            data, name = image, "the query image"
        else:
            try:
                data, name = Path(image).read_bytes(), str(image)
            except OSError as exc:
                raise SearchError(f"cannot read the query image {image}: {exc.strerror or exc}") from None
        try:
            decoded = decode_image(data, max_pixels=_QUERY_MAX_PIXELS)
        except ImageDecodeError as exc:
            raise SearchError(f"cannot decode the query image {name}: {exc}") from None
        model = self.query_model("image_embedding")
        return model.embed_images([decoded.image])[0]


def search_command(args) -> int:
    """`llava-pipeline search INDEX_URL "query"` / `--image FILE`: the hits, as lines or JSON."""
    import json

    from pipeline.index import endpoint_override

    storage = endpoint_override(StorageConfig(), args.endpoint_url) if args.endpoint_url else None
    if (args.query is None) == (args.image is None):
        raise SearchError('give a text query ("a red star") or --image FILE, not both')
    index = open_index(args.index, storage)
    hits = index.search(text=args.query, image=args.image, mode=args.mode, k=args.k)
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=2))
        return 0
    mode = args.mode or ("image" if args.image else index.default_mode())
    what = f"image {args.image}" if args.image else repr(args.query)
    print(f"{len(hits)} hit(s) for {what} (mode {mode}) in {index.url} ({index.count()} rows)")
    for rank, hit in enumerate(hits, 1):
        text = hit.caption if hit.caption is not None else f"[tags] {hit.tags}"
        print(f"{rank:3d}. {hit.score:8.4f}  {hit.shard_name}/{hit.key}  {text}")
    return 0
