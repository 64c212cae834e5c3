"""The thread policy (performer_pytorch/cpu_threads.py): 1 thread for small models, the free cores for large ones,
kept current while a model runs, never above what the user allowed."""

import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import training
from performer_pytorch import PerformerLM, cpu_threads

DEMO = dict(max_seq_len=801, dim=64, heads=4, dim_head=16)
FULL = dict(max_seq_len=16907, dim=200, heads=10, dim_head=64)


class _Sized(nn.Module):
    """Stands in for a model of a given size: the policy reads only `config`."""

    def __init__(self, **config):
        super().__init__()
        self.config = config
        self.layer = nn.Linear(2, 2)

    def forward(self, x):
        return self.layer(x)


class _Meter:
    def __init__(self, readings):
        self.readings = list(readings)

    def others_busy(self):
        return self.readings.pop(0)


@pytest.fixture
def two_threads(monkeypatch):
    """A 2-core machine on which torch may use 2 threads (the suite itself runs with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "_ceiling", 2)
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    yield
    torch.set_num_threads(before)


def test_work_sizes_put_the_demo_below_and_full_size_above_the_threshold():
    assert cpu_threads.model_work(_Sized(**DEMO)) < cpu_threads.SMALL_WORK < cpu_threads.model_work(_Sized(**FULL))
    assert cpu_threads.model_work(nn.Linear(2, 2)) == 0


def test_the_transformer_family_is_sized_by_its_own_measure():
    """A transformer at the recipe's size (12 x 512, cells up to 1,201 tokens) gets the free cores; the demo's
    (2 x 64 over 500 genes) one thread."""
    from transformer_model import GeneVocab, TransformerModel

    genes = [f"G{i}" for i in range(2000)]
    recipe = TransformerModel(vocab=GeneVocab(genes), dim=512, depth=1, heads=8, ff_dim=512)
    demo = TransformerModel(vocab=GeneVocab(genes[:500]), dim=64, depth=1, heads=4, ff_dim=64)
    assert cpu_threads.model_work(recipe) == 1201 * 512 * 512
    assert cpu_threads.model_work(demo) < cpu_threads.SMALL_WORK < cpu_threads.model_work(recipe)


def test_small_work_gets_one_thread_and_large_work_the_free_cores():
    small, large = cpu_threads.model_work(_Sized(**DEMO)), cpu_threads.model_work(_Sized(**FULL))
    assert cpu_threads.choose_threads(small, allowed=16) == 1
    assert cpu_threads.choose_threads(small, allowed=16, free_cores=16.0) == 1
    assert cpu_threads.choose_threads(large, allowed=2) == 2  # load unknown: every allowed thread
    assert cpu_threads.choose_threads(large, allowed=2, free_cores=2.0) == 2
    assert cpu_threads.choose_threads(large, allowed=2, free_cores=1.0) == 1  # one core busy elsewhere
    assert cpu_threads.choose_threads(large, allowed=2, free_cores=0.1) == 1  # never none
    assert cpu_threads.choose_threads(large, allowed=4, free_cores=16.0) == 4  # never above the ceiling
    assert cpu_threads.choose_threads(large, allowed=16, free_cores=11.4) == 11


def test_wrap_model_gives_a_small_model_one_thread(two_threads):
    model = PerformerLM(num_tokens=7, max_seq_len=9, dim=8, depth=1, heads=2, dim_head=4, g2v_position_emb=False)
    training.wrap_model(model, training.DistContext())
    assert torch.get_num_threads() == 1


def test_a_running_large_model_follows_the_free_cores(two_threads, monkeypatch):
    monkeypatch.setattr(cpu_threads, "RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(cpu_threads, "FIRST_LOOK_SECONDS", 0.0)
    model = _Sized(**FULL)
    assert cpu_threads.configure_threads(model) in (1, 2)
    policy = cpu_threads._policies[model]
    policy.meter = _Meter([1.0, 0.0, 0.9])  # another process takes a core, leaves, takes it again
    seen = []
    for _ in range(3):
        model(torch.zeros(1, 2))
        seen.append(torch.get_num_threads())
    assert seen == [1, 2, 1]


def test_a_user_limit_is_never_exceeded(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(cpu_threads, "_ceiling", None)
        assert cpu_threads.ceiling() == 1  # e.g. OMP_NUM_THREADS=1
        policy = cpu_threads.ThreadPolicy(cpu_threads.model_work(_Sized(**FULL)), meter=_Meter([0.0]))
        assert policy.apply() == 1 and not policy.adaptive
    finally:
        torch.set_num_threads(before)


def test_the_load_meter_sees_another_busy_process():
    meter = cpu_threads.LoadMeter()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        others = meter.others_busy()
    finally:
        busy.kill()
        busy.wait()
    assert others is not None and others >= 0.5  # the busy process (and whatever else the machine runs)
