"""Fixtures shared by the EFGS tests (test_efgs, test_forgery, test_partner_faults)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support_efgs import FakeEfgs


@pytest.fixture
def gateway() -> Iterator[FakeEfgs]:
    """An EFGS-compatible gateway double on loopback HTTPS."""
    g = FakeEfgs.start()
    try:
        yield g
    finally:
        g.release.set()  # ends any stall a fault test left in progress, so stop() does not wait on it
        g.stop()


@pytest.fixture
def efgs_settings(settings, tmp_path):
    """The session settings with a key directory of this test's own (EFGS private keys go there)."""
    return settings.replace(key_dir=tmp_path / "keys")
