"""Rates derived from counter samples: what the faults/s columns and sparklines show."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tui.live import RATE_WINDOW, LiveModel, Rates, VmChanged, VmDeleted


def sample(t, checked, sync=0, async_=0):
    return t, {"checked": checked, "sync_faults": sync, "async_faults": async_}


def test_rate_over_the_window():
    r = Rates()
    for i in range(11):                       # 10 faults/s, 1000 checks/s, sampled at 10 Hz
        r.add(*sample(i / 10, 100 * i, sync=i))
    assert abs(r.faults_per_s - 10) < 1e-9 and abs(r.checked_per_s - 1000) < 1e-9


def test_uneven_ticks_do_not_flicker_to_zero():
    """A worker ticking every 0.1 s sampled at 0.05 s: half the samples see no change."""
    r = Rates()
    seen = []
    for i in range(40):
        t = i * 0.05
        r.add(*sample(t, 0, sync=int(t * 10) * 5))     # 5 faults per 0.1 s tick = 50/s
        if t >= RATE_WINDOW:
            seen.append(r.faults_per_s)
    assert min(seen) > 40 and max(seen) < 60


def test_restart_resets():
    r = Rates()
    r.add(*sample(0, 1000, sync=50))
    r.add(*sample(1, 2000, sync=100))
    assert r.faults_per_s == 50
    r.add(*sample(2, 10, sync=0))            # counters began again
    assert r.faults_per_s == 0.0
    r.add(*sample(3, 20, sync=4))
    assert r.faults_per_s == 4


def test_repeated_sample_is_ignored():
    r = Rates()
    r.add(*sample(1, 10, sync=1))
    r.add(*sample(2, 20, sync=3))
    before = (r.faults_per_s, len(r.faults_history))
    r.add(*sample(2, 20, sync=3))
    assert (r.faults_per_s, len(r.faults_history)) == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 2.0), st.integers(0, 1000), st.integers(0, 50)), min_size=2, max_size=40))
def test_rates_are_never_negative_and_match_totals(steps):
    """Counters only grow: every rate is >= 0 and equals growth over the window actually used."""
    r = Rates()
    t, checked, faults = 0.0, 0, 0
    for dt, dc, df in steps:
        t, checked, faults = t + dt, checked + dc, faults + df
        r.add(*sample(t, checked, sync=faults))
        assert r.checked_per_s >= 0 and r.faults_per_s >= 0
    t0, c0, f0 = r._samples[0]
    if t > t0:
        assert abs(r.faults_per_s - (faults - f0) / (t - t0)) < 1e-6


def test_model_applies_events():
    m = LiveModel()
    vm = {"name": "a", "state": "running"}
    assert isinstance(m.apply({"type": "vm", "time": 1, "vm": vm}), VmChanged) and m.vms == {"a": vm}
    m.apply({"type": "counters", "time": 1, "vm": "a",
             "counters": {"time": 1.0, "vm": {"checked": 5}, "vcpus": [{"index": 0, "checked": 5}]}})
    assert m.live["a"].counters["vm"]["checked"] == 5 and 0 in m.live["a"].vcpu_rates
    assert isinstance(m.apply({"type": "vm", "time": 2, "deleted": "a"}), VmDeleted)
    assert m.vms == {} and m.live == {}
    assert m.apply({"type": "something-new", "time": 3}) is None     # newer daemons may send more
