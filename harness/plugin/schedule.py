"""The order tests run in: longest first, so that xdist's workers end together.

xdist's ``load`` scheduling hands tests out in collection order; the longest ones
collected last would leave one worker running them while the other idles.  Ranks:

0. tests that pay for seconds of QEMU (``guest``, ``waits``): the first of a ``shares``
   group (it makes the run the others check);
1. the other long ones: self-tests (each runs pytest or a tool);
2. the rest (milliseconds each);
3. the other tests of a ``shares`` group: they take milliseconds once the run is made,
   so they go last, when no worker is still making it.

Ranks follow ``-m`` / ``-k`` deselection (``trylast``): a group's first *selected* test
pays for its run.
"""

from __future__ import annotations

import pytest

_PAYS_FOR_QEMU = ("guest", "waits")


def _rank(item: pytest.Item, sharing: set[str]) -> int:
    shares = item.get_closest_marker("shares")
    if shares is not None:
        key = shares.args[0]
        if key in sharing:
            return 3
        sharing.add(key)
    if any(item.get_closest_marker(m) for m in _PAYS_FOR_QEMU):
        return 0
    return 1 if item.get_closest_marker("selftest") else 2


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    sharing: set[str] = set()
    rank = {item.nodeid: _rank(item, sharing) for item in items}
    items.sort(key=lambda item: rank[item.nodeid])  # stable: collection order within a rank


def pytest_configure(config: pytest.Config) -> None:
    """xdist hands each worker a quarter of its share at once, so one worker would get
    every long test: two at a time instead (unless given), which with the longest
    first is as good as the order allows."""
    if config.pluginmanager.hasplugin("xdist") and \
            config.getoption("maxschedchunk", None) is None:
        config.option.maxschedchunk = 2
