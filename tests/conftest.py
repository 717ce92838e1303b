"""Shared test setup: one torch thread (tests compare numbers bit for bit), quiet Ray, and the
fixtures more than one test file uses.

Layout: unit tests are tests/test_*.py; end-to-end scenarios (real studies, the documented
commands in subprocesses, Ray clusters, S3, interrupts) are tests/scenarios/test_*.py and run
after the unit tests. tests/ is not a package: pytest puts tests/ on ``sys.path`` for this
file and tests/scenarios/ for the files there, so helper modules are imported by name
(``from helpers import load_script``, ``from real_layouts import make_voc``) and test file
names must be unique across both folders.
"""

import os

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first, the scenarios after them (a stable sort: each file's tests keep their
    order and stay together, so module fixtures are set up once)."""
    items.sort(key=lambda item: str(item.path).startswith(SCENARIOS + os.sep))


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray for the module, started as a study starts it (``init_ray``: loopback
    127.0.0.1, 2 CPUs, a 300 MiB object store, no dashboard, Ray's and Tune's environment
    defaults) and shut down after the module if this fixture started it."""
    ray = pytest.importorskip("ray")
    from ctt.tune.ray_setup import init_ray
    from ctt.tune.runtime import StudyOptions

    started = not ray.is_initialized()
    init_ray(StudyOptions(name="tests", num_cpus=2))
    yield
    if started:
        ray.shutdown()
