from __future__ import annotations

import pytest

from pipeline.environment import variables_set


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Unit tests first, then integration tests, then `background` tests (whose scenarios ran meanwhile).
    GPU tests run where CUDA is present and are skipped, visibly, elsewhere."""
    items.sort(
        key=lambda item: (item.get_closest_marker("background") is not None, item.path.parent.name == "integration")
    )
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def node_cache(tmp_path_factory: pytest.TempPathFactory):
    """The session's node cache (`LLAVA_PIPELINE_CACHE`): fetched checkpoints and passed processor checks stay
    out of the user's home and are shared by the session's runs, as a node's are by its nightly runs."""
    path = tmp_path_factory.mktemp("node-cache")
    with variables_set({"LLAVA_PIPELINE_CACHE": str(path)}):
        yield path


@pytest.fixture(scope="session", autouse=True)
def background_scenarios(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, node_cache):
    """{test id: its scenario} for the session's `background` tests, each started here, as the session starts.

    A background scenario runs in processes of its own (a Ray cluster of its own) and spends most of its time
    waiting: for nodes and actors to start, for a node to be noticed gone. Started with the session, it runs
    beside the tests in this process instead of after them; its test, ordered last, checks what it did."""
    started = {}
    for item in request.session.items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            started[item.nodeid] = marker.args[0](tmp_path_factory.mktemp("background"))
    yield started
    for scenario in started.values():
        scenario.stop()
