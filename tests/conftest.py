"""Shared pytest settings: the `on_mesh` marker (tests/test_sharding.py's 8-device tests)."""
from __future__ import annotations

import os


def pytest_configure(config):
    config.addinivalue_line("markers", "on_mesh: runs only in test_sharding's 8-device subprocess "
                                       "(SPARQ_TEST_MESH=1); deselected elsewhere")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SPARQ_TEST_MESH") == "1":
        return
    kept, left_out = [], []
    for item in items:
        (left_out if item.get_closest_marker("on_mesh") else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
