"""Chunk tasks on CPU threads (performer_pytorch/cpu_workers.py): same numbers with any thread count, the caller's
thread settings kept, the task graph's order and errors."""

import contextlib
import threading

import pytest
import torch

from performer_pytorch import PerformerLM, cpu_workers, plain_attention


@pytest.fixture(autouse=True)
def threads_for_tiny_tasks(monkeypatch):
    """The tiny test models' chunk tasks would run in the calling thread (MIN_TASK_WORK): here they go to threads."""
    monkeypatch.setattr(cpu_workers, "MIN_TASK_WORK", 0)


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_and_cells(depth: int = 3):
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=7, max_seq_len=61, dim=24, depth=depth, heads=3, dim_head=8, g2v_position_emb=False)
    model.set_chunk_size(16)  # 4 chunks per cell
    tokens = torch.randint(0, 7, (3, 61), generator=torch.Generator().manual_seed(1))
    return model, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_threads_compute_exactly_what_one_does(dtype):
    model, tokens = model_and_cells()
    model.eval()

    def logits():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model(tokens)

    with torch_threads(1):
        assert cpu_workers.count(torch.device("cpu")) == 1
        one = logits()
    with torch_threads(2):
        assert cpu_workers.count(torch.device("cpu")) == 2
        two = logits()
        with plain_attention():
            plain = logits()
    assert torch.equal(one, two), "every chunk task computes the same numbers on whichever thread"
    if dtype == torch.float32:
        assert (two - plain).abs().max() < 1e-5


def test_frozen_blocks_on_two_threads_give_the_same_gradients():
    """As finetune.py freezes: blocks 0-1 take the no-grad route (on the threads), block 2 trains."""
    model, tokens = model_and_cells(depth=4)
    model.train()
    model.fix_projections()
    model.requires_grad_(False)
    model.performer.net.layers[-2].requires_grad_(True)

    def grads():
        model.zero_grad(set_to_none=True)
        model(tokens).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    with torch_threads(1):
        one = grads()
    with torch_threads(2):
        two = grads()
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:  # the autograd blocks run their ops on 1 or 2 threads: sums may be added in another order
        assert torch.allclose(one[name], two[name], rtol=1e-5, atol=1e-8), name


def test_callers_thread_count_and_new_threads_default_are_kept():
    with torch_threads(2):
        assert cpu_workers.count(torch.device("cpu")) == 2
        assert torch.get_num_threads() == 2
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [2], "a thread started after the pool still gets the process default"
        # The pool's own threads run ops on one core each.
        counts = []
        cpu_workers.run_graph([(0, "a", lambda s: counts.append(torch.get_num_threads()))], lambda k, r: [], [0, 1])
        assert counts == [1]
    assert cpu_workers.count(torch.device("meta")) == 1


def test_task_graph_runs_each_task_once_after_what_it_waits_for():
    # Task i (0..19) may start only when task i - 1 is done if i is odd; even tasks are ready at once.
    done, states_seen = [], set()

    def task(i):
        def fn(state):
            states_seen.add(state)
            return i

        return (i % 3, i, fn)

    def on_done(key, result):
        done.append(result)
        follow = key + 1
        return [task(follow)] if follow % 2 == 1 and follow < 20 else []

    with torch_threads(2):
        cpu_workers.count(torch.device("cpu"))
        cpu_workers.run_graph([task(i) for i in range(0, 20, 2)], on_done, ["ws0", "ws1"])
    assert sorted(done) == list(range(20))
    for i in range(1, 20, 2):
        assert done.index(i) > done.index(i - 1)
    assert states_seen <= {"ws0", "ws1"}


def test_a_failing_task_stops_the_run_and_its_error_is_raised():
    def on_done(key, result):
        return []

    def fail(state):
        raise ValueError("broken chunk")

    with torch_threads(2):
        cpu_workers.count(torch.device("cpu"))
        tasks = [(0, 0, lambda s: 1), (1, 1, fail), (2, 2, lambda s: 2)]
        with pytest.raises(ValueError, match="broken chunk"):
            cpu_workers.run_graph(tasks, on_done, ["a", "b"])
        # The pool still works afterwards.
        results = []
        cpu_workers.run_graph([(0, 0, lambda s: 5)], lambda k, r: results.append(r) or [], ["a", "b"])
        assert results == [5]


def test_inference_mode_of_the_caller_holds_on_the_threads():
    """predict.py runs the model under torch.inference_mode(): chunk tasks update its tensors in place."""
    model, tokens = model_and_cells()
    model.eval()
    with torch_threads(2), torch.inference_mode():
        assert cpu_workers.count(torch.device("cpu")) == 2
        two = model(tokens)
    with torch_threads(1), torch.inference_mode():
        one = model(tokens)
    assert torch.equal(one, two)


def test_small_chunk_tasks_stay_in_the_calling_thread(monkeypatch):
    monkeypatch.setattr(cpu_workers, "MIN_TASK_WORK", 1 << 24)
    threads_used = []
    real = cpu_workers.run_graph

    def spy(first, on_done, states):
        threads_used.append(len(states))
        return real(first, on_done, states)

    monkeypatch.setattr(cpu_workers, "run_graph", spy)
    model, tokens = model_and_cells()
    with torch_threads(2), torch.no_grad():
        model.eval()(tokens)
        monkeypatch.setattr(cpu_workers, "MIN_TASK_WORK", 0)
        model(tokens)
    assert threads_used == [1, 2]
