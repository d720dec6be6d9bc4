"""CPU thread teams: a thread that hands its compute to the engine gives its OpenMP workers back; a Ray copy of the
model gets its share of the cores."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from moonbase.device import _omp_pause, ray_copies, release_cpu_threads


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


class _Cluster:
    """What `ray_copies` reads of a Ray cluster: its total resources and its nodes."""

    def __init__(self, node_cpus: list[int], gpus: int = 0):
        self.node_cpus, self.gpus = node_cpus, gpus

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": float(sum(self.node_cpus))} | ({"GPU": float(self.gpus)} if self.gpus else {})

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": float(c)}} for c in self.node_cpus] + [
            {"Alive": False, "Resources": {"CPU": 64.0}}
        ]


def test_ray_copies_give_each_cpu_copy_its_share_of_the_cores_and_each_gpu_copy_one_gpu():
    assert ray_copies(_Cluster([2]), None) == (1, {"num_gpus": 0, "num_cpus": 2})  # not 1: that is one torch thread
    assert ray_copies(_Cluster([2]), 2) == (2, {"num_gpus": 0, "num_cpus": 1})
    assert ray_copies(_Cluster([2]), 3) == (3, {"num_gpus": 0, "num_cpus": 1})  # never below one
    assert ray_copies(_Cluster([8, 8]), 2) == (2, {"num_gpus": 0, "num_cpus": 8})
    assert ray_copies(_Cluster([8, 4]), 1) == (1, {"num_gpus": 0, "num_cpus": 8})  # no more than a live node has
    assert ray_copies(_Cluster([16], gpus=4), None) == (4, {"num_gpus": 1, "num_cpus": 0})
    assert ray_copies(_Cluster([16], gpus=4), 2) == (2, {"num_gpus": 1, "num_cpus": 0})
