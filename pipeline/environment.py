"""This process's environment for a block, put back after it: variables, and torch marked absent."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def variables_set(variables: dict[str, str]) -> Iterator[None]:
    """`variables` in `os.environ` inside the block; each as it was (or unset) after it. For what a child process
    started inside the block inherits, such as a local Ray's workers."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def torch_marked_absent() -> Iterator[None]:
    """Imports inside the block take the path they take where torch is not installed, unless torch is loaded
    already; torch is importable again after the block.

    For processes that use a library's torch-free parts only: webdataset, and transformers' tokenizers, chat
    templates and PIL image processors, import torch whenever it is installed (1-4 CPU-seconds and about 240 MB)
    without needing it there. `import torch` inside the block raises ModuleNotFoundError, which those libraries
    take for torch not being installed. Modules imported inside the block keep their torch-free choices."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
