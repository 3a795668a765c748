"""The one timing helper of the benchmarks and the self-check: order, warm-up, medians, syncs."""

import pytest
import torch

from megadistill.bench import timing


class FakeClock:
    """A clock that only the callables move: each call adds its own known duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_interleaves_alternates_and_excludes_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(timing.CLOCKS, "wall", clock)
    monkeypatch.setitem(timing.CLOCKS, "cpu", clock)
    log: list[str] = []
    cost = {"a": [9.0, 1.0, 5.0, 3.0], "b": [7.0, 2.0, 4.0, 6.0]}  # per call, warm-up first

    def call(name):
        def fn():
            clock.now += cost[name][sum(1 for x in log if x == name) % 4]
            log.append(name)
            return len(log)

        return fn

    hooks: list[str] = []
    got = timing.measure(
        {"a": call("a"), "b": call("b")}, repeats=3, warmup=1,
        before=lambda n: hooks.append("+" + n), after=lambda n: hooks.append("-" + n),
    )  # fmt: skip
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a"]  # round 1 (warm-up) then reversed
    assert hooks[:4] == ["+a", "-a", "+b", "-b"] and len(hooks) == 16
    assert got["a"].wall == [1.0, 5.0, 3.0] and got["b"].wall == [2.0, 4.0, 6.0]  # no warm-up
    assert got["a"].cpu == got["a"].wall
    assert got["a"].values == [4, 5, 8] and got["b"].values == [3, 6, 7]
    assert got["a"].median() == 3.0 and got["b"].median("cpu") == 4.0
    assert got["b"].total() == 12.0
    assert got["b"].stderr() == pytest.approx(2.0 / 3**0.5)  # stdev 2, 3 samples
    plain = timing.measure({"a": call("a"), "b": call("b")}, repeats=2, alternate=False)
    assert log[8:] == ["a", "b", "a", "b"] and len(plain["a"].wall) == 2
    with pytest.raises(ValueError, match="repeats"):
        timing.measure({"a": call("a")}, repeats=0)


def test_cuda_device_is_synchronised_around_each_call(monkeypatch):
    syncs: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(str(device)))
    timing.measure({"a": lambda: syncs.append("call")}, repeats=2, device="cuda")
    assert syncs == ["cuda", "call", "cuda"] * 2
    syncs.clear()
    timing.measure({"a": lambda: syncs.append("call")}, device="cpu")
    with timing.Stopwatch(device=torch.device("cuda", 0)) as sw:
        syncs.append("block")
    assert syncs == ["call", "cuda:0", "block", "cuda:0"] and sw.wall >= 0.0
    clock = timing.Clock("cpu", device="cuda")
    assert clock() >= 0.0 and syncs[-1] == "cuda"
    with pytest.raises(ValueError, match="clock='gpu'"):
        timing.Clock("gpu")


def test_median_by_key():
    rows = [{"x": 3.0, "y": 1.0}, {"x": 1.0, "y": 2.0}, {"x": 2.0, "y": 9.0}]
    assert timing.median_by_key(rows) == {"x": 2.0, "y": 2.0}
