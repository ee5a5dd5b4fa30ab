"""mmfast.train.timing.interleaved_medians: what the demo's and the CPU benchmarks' speed ratios rest on."""

import mmfast.train.timing as timing


def test_interleaved_medians_alternate_the_order_and_time_only_the_rounds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    calls, syncs = [], []

    def step(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds
        return run

    seconds = {"a": [5.0, 1.0, 2.0, 3.0], "b": [9.0, 4.0, 6.0, 8.0]}  # first call of each: the warm-up
    steps = {n: (lambda n=n: step(n, seconds[n].pop(0))()) for n in seconds}
    med = timing.interleaved_medians(steps, rounds=3, warmup=1, sync=lambda: syncs.append(1))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert med == {"a": 2.0, "b": 6.0}  # medians of the timed rounds, the warm-up left out
    assert len(syncs) == 2 * 3 * 2  # before and after every timed call
