"""The agent's fallbacks when the kernel refuses its BPF program: counting with a hist trigger on
the tracepoint, or (no hist triggers either) by reading every trace line; and the BPF program's
own fallback for pids beyond its pid array (kernel.pid_max raised): counting them in its hash
map (bpf-pid-hash: every pid counted that way). Forced here with the kernel command line
(mtevm.counting=...); each must give the same exact counts. One boot per method; QEMU is stopped
by its PID.
"""
from __future__ import annotations

import pytest

from tests.guests.bare_linux import booted

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module", params=["histogram", "trace", "bpf-pid-hash"])
def guest(request, linux_image):
    with booted(linux_image, smp=2, append=f"mtevm.counting={request.param}") as (vm, link):
        yield request.param, link


def test_fallback_counts_exactly(guest):
    method, link = guest
    h = link.hello()
    if method == "bpf-pid-hash":
        assert h["counting"] == "bpf"
    else:
        assert h["counting"] == method and f"mtevm.counting={method}" in h["counting_note"]
    link.send({"type": "hello"})
    before = link.wait_for("faults", timeout=10)["totals"]
    r = link.run("f", path="/opt/mtevm/bin/mte-faults", args=["37", "23"])
    assert r["exit"]["status"] == 0
    faults = [m for m in r["messages"] if m["type"] == "faults"]
    after = faults[-1]["totals"]
    assert (after["sync"] - before["sync"], after["async"] - before["async"]) == (37, 23)
    pid = r["started"]["pid"]
    procs = [p for m in faults for p in m["processes"] if p["pid"] == pid]
    assert procs[-1] == {"pid": pid, "comm": "mte-faults", "sync": 37, "async": 23}
    assert sum(c["sync"] for c in faults[-1]["cpus"]) == after["sync"]
    # fault addresses are on by default: every fault is an event
    events = [e for m in faults for e in m["events"] if e["pid"] == pid]
    assert len(events) == 60 and all(e["ptr_tag"] == 5 for e in events if e["code"] == 9)
