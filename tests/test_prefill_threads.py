"""workers.prefill_threads: more threads only for an idle worker's prefill, and only while measured faster."""
from __future__ import annotations

import torch

from workers.prefill_threads import EXPLORE_EVERY, MIN_TOKENS, PrefillThreads


def test_tries_both_then_keeps_the_faster_and_looks_again_now_and_then():
    p = PrefillThreads()
    p.configure(base=1, most=2)
    assert p.choose() == 2
    p.record(2, 40, 0.1)
    assert p.choose() == 1
    p.record(1, 40, 0.4)  # 2 threads were 4x faster
    picks = [p.choose() for _ in range(4 * EXPLORE_EVERY)]
    assert picks.count(2) == len(picks) - 4 and picks.count(1) == 4  # one look at the other in EXPLORE_EVERY
    for _ in range(5):
        p.record(2, 40, 2.0)  # the machine got busy: 2 threads now 5x slower than 1 was
    picks = [p.choose() for _ in range(2 * EXPLORE_EVERY)]
    assert picks.count(1) == len(picks) - 2 and picks.count(2) == 2
    rates = dict(p._rate)
    p.record(1, MIN_TOKENS - 1, 100.0)  # too short to count
    assert p._rate == rates


def test_only_an_idle_worker_changes_the_thread_count_and_it_is_restored():
    before = torch.get_num_threads()
    p = PrefillThreads()
    p.configure(base=1, most=2)
    try:
        torch.set_num_threads(1)
        with p.around(idle=False, tokens=40):
            assert torch.get_num_threads() == 1
        with p.around(idle=True, tokens=40):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1 and 2 in p._rate
        off = PrefillThreads()  # not configured (a GPU worker, or --prefill-threads not given)
        with off.around(idle=True, tokens=40):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
