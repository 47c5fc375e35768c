"""Tools around the pipeline, kept off its run path: `bench`, `eval`, `demo` and the shapes model's training.

`llava-pipeline run`, `retry-failed`, `validate` and `schema` never import this package; the CLI imports a
tool's module only when that tool's command runs.
"""
