"""The CLI's allocator settings: applied with glibc, never over the user's own glibc tunables."""

import ctypes
import sys

import pytest

from stillroom import allocator


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt is only on Linux with glibc")
def test_set_with_glibc(monkeypatch):
    for name in allocator.USER_TUNABLES:
        monkeypatch.delenv(name, raising=False)
    assert allocator.keep_freed_memory() is True


@pytest.mark.parametrize("name", allocator.USER_TUNABLES)
def test_the_users_own_tunables_win(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert allocator.keep_freed_memory() is False


def test_the_cli_applies_it(monkeypatch):
    from stillroom.cli import main

    called = []
    monkeypatch.setattr(main, "keep_freed_memory", lambda: called.append(1) or True)
    assert main.main(["validate", "quickstart"]) == 0
    assert called == [1]
