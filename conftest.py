"""Root conftest: the harness's pytest plugin serves the suite and the self-tests."""

pytest_plugins = ["harness.plugin"]
