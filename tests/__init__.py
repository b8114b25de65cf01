"""The test suite as a package, so test modules import shared helpers with `from tests.conftest import ...`."""
