"""The stages rows flow through, in order: the one list the runner loops over to build the dataset.

    shards -> read -> prepare -> model -> parse -> embed (with `embed:`) -> driver (commit)

Adding a stage: write its module (a `RowStage` subclass and its `MapStage` declaration, see
`pipeline.stages.base`), add its section to `pipeline.config.StagesConfig`, and add it here. A stage
that only some jobs run says which in its declaration (`MapStage.enabled`).
"""

from __future__ import annotations

from pipeline.stages.embed import EMBED
from pipeline.stages.generate import MODEL
from pipeline.stages.parse import PARSE
from pipeline.stages.prepare import PREPARE
from pipeline.stages.read import READ

STAGES = (READ, PREPARE, MODEL, PARSE, EMBED)
