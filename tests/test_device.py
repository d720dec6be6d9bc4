"""CPU thread teams: a thread that hands its compute to the engine gives its OpenMP workers back."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from moonbase.device import _omp_pause, release_cpu_threads


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(_omp_pause() is None or torch.get_num_threads() < 2, reason="needs libgomp and two CPU threads")
def test_release_cpu_threads_lets_this_threads_workers_exit():
    counts = []

    def work() -> None:
        a = torch.randn(512, 512)
        for _ in range(3):
            a @ a  # large enough to run on every OpenMP thread: this thread now has a team
        counts.append(_os_threads())
        release_cpu_threads()
        counts.append(_os_threads())
        release_cpu_threads()  # no team left: nothing to do
        counts.append(_os_threads())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    with_team, released, again = counts
    assert released <= with_team - (torch.get_num_threads() - 1)
    assert again <= released  # other threads (idle engines of earlier tests) may give theirs back meanwhile
