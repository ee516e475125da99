"""The worker's allocator setting (workers/allocator.py): freed memory kept while busy, handed back when idle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers import allocator
from workers.allocator import IDLE_RELEASE_S, IdleRelease

REPO = Path(__file__).resolve().parents[1]

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc's mallopt and malloc_trim")

# In a fresh process: a 16 MiB block is allocated, touched, and freed; its resident size is read
# after the free, then after an idle spell's release.
_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    sys.path.insert(0, sys.argv[1])
    from workers.allocator import IDLE_RELEASE_S, IdleRelease, keep_freed_memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    kept = keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20
    before = rss()
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    touched = rss()
    libc.free(p)
    freed = rss()
    release = IdleRelease(kept)
    release.tick(busy=True, now=0.0)
    release.tick(busy=False, now=0.0)
    released = release.tick(busy=False, now=IDLE_RELEASE_S + 1)
    print(json.dumps({"kept": kept, "before": before, "touched": touched, "freed": freed,
                      "released": released, "after": rss()}))
""")


def _probe(keep: str) -> dict:
    env = {**os.environ, "LOOM_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO)], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


MIB = 1 << 20


@glibc
def test_freed_block_stays_while_busy_and_goes_back_when_idle():
    r = _probe("1")
    assert r["kept"] is True
    assert r["touched"] - r["before"] >= 15 * MIB
    # Kept: a 16 MiB block is no longer unmapped on free (glibc's default would be).
    assert r["freed"] - r["before"] >= 15 * MIB, r
    assert r["released"] is True
    assert r["freed"] - r["after"] >= 15 * MIB, r  # the idle release gave it back


@glibc
def test_switched_off_keeps_glibc_defaults():
    r = _probe("0")
    assert r["kept"] is False
    assert r["touched"] - r["before"] >= 15 * MIB
    assert r["touched"] - r["freed"] >= 15 * MIB, r  # unmapped at once, as glibc does by default
    assert r["released"] is False


def test_idle_release_waits_for_an_idle_spell_and_releases_once_per_spell():
    r = IdleRelease(True)
    assert not r.tick(busy=True, now=0.0)
    assert not r.tick(busy=False, now=1.0)  # idle from here
    assert not r.tick(busy=False, now=1.0 + IDLE_RELEASE_S / 2)
    assert r.tick(busy=False, now=1.0 + IDLE_RELEASE_S)
    assert not r.tick(busy=False, now=10.0 + IDLE_RELEASE_S)  # once per spell
    assert not r.tick(busy=True, now=20.0)
    assert not r.tick(busy=False, now=21.0)
    assert r.tick(busy=False, now=21.0 + IDLE_RELEASE_S)  # the next spell releases again


def test_idle_release_does_nothing_when_disabled():
    r = IdleRelease(False)
    assert not r.tick(busy=False, now=0.0)
    assert not r.tick(busy=False, now=100.0)


def test_no_release_right_after_start():
    # A worker that has never run anything holds nothing extra: no trim on the first idle ticks.
    r = IdleRelease(True)
    assert not r.tick(busy=False, now=0.0)
    assert not r.tick(busy=False, now=100.0)
