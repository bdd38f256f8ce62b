"""Importing ``sparcode.engine`` asks torch for huge pages before any CPU tensor exists."""

import os
import subprocess
import sys

import pytest

from sparcode.engine import hugepages

# torch page-aligns a huge-page allocation; glibc's own big blocks start 64 bytes into a page
PROBE = ("import os, sparcode.engine, torch; x = torch.empty(2**21); "
         "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), x.data_ptr() % 4096)")


def probe(value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != hugepages.VARIABLE}
    if value is not None:
        env[hugepages.VARIABLE] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_import_turns_huge_pages_on_and_keeps_a_preset_value():
    assert probe(None) == ["1", "0"]  # on, and torch took its huge-page path for an 8 MiB tensor
    assert probe("0")[0] == "0"  # a user's choice stands


def test_nothing_is_set_off_linux(monkeypatch):
    monkeypatch.delenv(hugepages.VARIABLE, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hugepages.request_huge_pages() is False and hugepages.VARIABLE not in os.environ
    monkeypatch.setattr(sys, "platform", "linux")
    assert hugepages.request_huge_pages() is True and os.environ[hugepages.VARIABLE] == "1"
