"""Bad input to every API call: a clear MtevmError, and nothing in the store changes.

Generated calls go to the in-process client (fast); a fixed set of the same bad calls is then
sent to a real daemon over its socket, which must raise the same class with the same message.
"""
from __future__ import annotations

import asyncio
import math
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.client import connect
from backend.errors import MtevmError
from backend.hosts.workload import TCF_NAMES

EXISTING = ("alpha", "beta")
VALID = {"name": "fresh", "host": "sim-mte", "accel": "kvm", "cpu": "host", "vcpus": 2, "memory": "256M",
         "mte": True, "secure": False, "only_migratable": False}

not_bool = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(allow_nan=False),
                     st.lists(st.booleans(), max_size=2))
junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
unknown_name = st.one_of(st.text(max_size=40).filter(lambda s: s not in EXISTING), st.integers(), st.none(),
                         st.lists(st.text(max_size=3), max_size=2))
unknown_host = st.one_of(st.text(max_size=20).filter(lambda s: s not in ("sim-mte", "sim-nomte", "local")),
                         st.integers(), st.lists(st.integers(), max_size=2))

# One field of an otherwise valid definition made bad (or the whole thing not a definition).
bad_field = st.one_of(
    st.tuples(st.just("name"), st.one_of(st.just(""), st.text(min_size=33, max_size=40),
                                         st.from_regex(r"\A[A-Z /]{1,8}\Z"), st.integers(), st.none(),
                                         st.sampled_from(EXISTING))),
    st.tuples(st.just("vcpus"), st.one_of(st.integers(max_value=0), st.integers(min_value=513),
                                          st.text(max_size=4), st.booleans(), st.floats())),
    st.tuples(st.just("memory"), st.one_of(st.integers(max_value=-1), st.integers(min_value=0, max_value=1 << 20),
                                           st.sampled_from(["lots", "12Q", "-1G", "1.00001K", "2T"]),
                                           st.lists(st.integers(), max_size=1))),
    st.tuples(st.just("cpu"), st.text(max_size=12).filter(lambda s: s not in ("max", "host", "cortex-a57",
                                                                                "cortex-a710", "neoverse-n2"))),
    st.tuples(st.just("accel"), st.one_of(st.from_regex(r"\A[^a-z].{0,5}\Z"), st.integers(), st.just("tcg"))),
    # (null is not bad in a definition: it means "the default")
    st.tuples(st.sampled_from(["mte", "secure", "only_migratable"]), not_bool.filter(lambda v: v is not None)),
    st.tuples(st.just("host"), unknown_host),
    st.tuples(st.sampled_from(["colour", "vcpu", "Memory", ""]), junk),
    st.tuples(st.just("workload"), st.one_of(
        st.fixed_dictionaries({"tcf": st.one_of(st.just([]), st.lists(st.text(max_size=6).filter(
            lambda s: s not in TCF_NAMES), min_size=1, max_size=3))}),
        st.fixed_dictionaries({"uaf_rate": st.one_of(st.floats(min_value=1.0001), st.floats(max_value=-0.0001),
                                                     st.text(max_size=3))}),
        st.fixed_dictionaries({"rate": st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=3))}),
        st.fixed_dictionaries({"heap_size": st.integers().filter(lambda n: n % 4096 or not 4096 <= n <= 1 << 30)}),
        st.dictionaries(st.sampled_from(["colour", "speed"]), st.integers(), min_size=1),
        st.sampled_from([[], "seed=1", 3]))),
)


def _definition(field_value):
    key, value = field_value
    if key == "accel" and value == "tcg":
        return {**VALID, "accel": "tcg"}  # keeps cpu "host": QEMU's "The 'host' CPU type can only be used with KVM"
    return {**VALID, key: value}


bad_calls = st.one_of(
    st.tuples(st.just("create"), st.builds(lambda fv: (_definition(fv),), bad_field)),
    st.tuples(st.just("create"), st.tuples(st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                                     st.lists(st.integers(), max_size=2)))),
    st.tuples(st.sampled_from(["show", "start", "stop", "delete", "vcpus", "counters"]), st.tuples(unknown_name)),
    st.tuples(st.sampled_from(["stop"]), st.tuples(st.sampled_from(EXISTING))),       # not running
    st.tuples(st.just("set_mte"), st.tuples(st.sampled_from(EXISTING), not_bool)),
    st.tuples(st.just("set_mte"), st.tuples(unknown_name, st.booleans())),
    st.tuples(st.just("set_tcf"), st.tuples(st.sampled_from(EXISTING),
                                            st.one_of(st.integers().filter(lambda i: not 0 <= i < 2),
                                                      st.text(max_size=3), st.floats(), st.just(True)),
                                            st.sampled_from(TCF_NAMES))),
    st.tuples(st.just("set_tcf"), st.tuples(st.sampled_from(EXISTING), st.one_of(st.none(), st.just(0)),
                                            st.one_of(st.text(max_size=8).filter(lambda s: s not in TCF_NAMES),
                                                      st.integers(), st.none()))),
    st.tuples(st.just("migrate"), st.tuples(st.sampled_from(EXISTING), unknown_host, st.booleans())),
    st.tuples(st.just("migrate"), st.tuples(st.sampled_from(EXISTING), st.just("sim-nomte"), not_bool)),
    st.tuples(st.just("migrate"), st.tuples(st.sampled_from(EXISTING), st.just("sim-nomte"), st.booleans())),
    st.tuples(st.just("probe"), st.tuples(unknown_host)),
    st.tuples(st.just("events"), st.tuples(st.one_of(
        st.floats(max_value=0), st.floats(min_value=50.001), st.just(math.nan), st.just(math.inf),
        st.text(max_size=4), st.none(), st.booleans()))),
)


def store_snapshot(path: str) -> list:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(t, db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall())
                for t in ("vms", "pending", "runtime", "migrations")]
    finally:
        db.close()


async def call(client, op: str, args: tuple):
    if op == "events":
        events = client.events(*args)
        try:
            return await anext(events)
        finally:
            await events.aclose()
    return await getattr(client, op)(*args)


async def populate(client) -> None:
    for name in EXISTING:
        await client.create({"name": name})
    await client.create({"name": "beta-pending", "host": "sim-nomte", "mte": False})


@pytest.fixture
def world(mtevm_paths):
    """A loop and an in-process client with a few VMs, shared by every generated example."""
    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(connect(in_process=True))
    loop.run_until_complete(populate(client))
    yield loop, client
    loop.run_until_complete(client.close())
    loop.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_calls)
def test_bad_input_gives_a_clear_error_and_changes_nothing(world, mtevm_paths, bad):
    loop, client = world
    op, args = bad
    before = store_snapshot(mtevm_paths.store)
    listed = loop.run_until_complete(client.list())
    with pytest.raises(MtevmError) as e:
        loop.run_until_complete(call(client, op, args))
    message = str(e.value)
    assert message and "Traceback" not in message and len(message) < 500
    assert store_snapshot(mtevm_paths.store) == before
    assert loop.run_until_complete(client.list()) == listed


# The same bad calls over both transports: same class, same message.
PARITY_CASES = [
    ("show", ("nosuch",)), ("show", ("",)), ("show", ("a/b",)), ("show", ("../../etc",)), ("show", (3,)),
    ("start", ("zz",)), ("stop", ("alpha",)), ("delete", ("x y",)),
    ("create", ({"name": "alpha"},)), ("create", ({"name": "Bad Name"},)), ("create", ({"name": "n", "vcpus": 0},)),
    ("create", ({"name": "n", "memory": "lots"},)), ("create", ({"name": "n", "colour": "red"},)),
    ("create", ({"name": "n", "host": "mars"},)), ("create", ([1, 2],)), ("create", ("n",)),
    ("create", ({"name": "n", "workload": {"tcf": ["often"]}},)),
    ("set_mte", ("alpha", "yes")), ("set_mte", ("alpha", None)), ("set_tcf", ("alpha", 7, "sync")),
    ("set_tcf", ("alpha", None, "sometimes")), ("migrate", ("alpha", "mars", False)),
    ("migrate", ("alpha", "sim-nomte", "yes")), ("migrate", ("alpha", "sim-nomte", False)),
    ("probe", ("mars",)), ("events", (0,)), ("events", (1000,)), ("vcpus", ("nosuch",)),
]


async def test_both_transports_raise_the_same_errors(mtevm_paths):
    local = await connect(in_process=True, state_dir=mtevm_paths.state_dir + "-inproc")
    remote = await connect()
    try:
        await populate(local)
        await populate(remote)
        # and the good calls agree too (defaulted arguments included)
        assert await local.hosts() == await remote.hosts()
        assert [r["host"] for r in await local.probe()] == [r["host"] for r in await remote.probe()]
        assert await local.list() == await remote.list()
        for op, args in PARITY_CASES:
            results = []
            for client in (local, remote):
                with pytest.raises(MtevmError) as e:
                    await call(client, op, args)
                results.append((type(e.value).__name__, str(e.value)))
            assert results[0] == results[1], (op, args)
    finally:
        await local.close()
        await remote.close()
