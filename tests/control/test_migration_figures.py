"""A simulated migration reports RAM figures as QEMU's query-migrate does: the total is the VM's
memory, zero pages count as "duplicate" (not sent), written pages as "normal" (sent), and the
progress a user watches follows those figures up to completion."""
from __future__ import annotations

import asyncio
import json

MIB = 1 << 20


def assert_whole_ram_accounted(stats: dict, memory: int) -> None:
    assert stats["ram_total"] == memory
    assert stats["ram_remaining"] == 0
    assert stats["ram_transferred"] == stats["ram_normal"] * stats["ram_page_size"]
    assert stats["ram_transferred"] + stats["ram_duplicate"] * stats["ram_page_size"] == stats["ram_total"]


async def test_service_api_migration_figures_and_progress(inproc_client):
    client = inproc_client
    await client.create({"name": "figs", "mte": False, "memory": "64M", "workload": {"rate": 0}})
    await client.start("figs")
    updates: list[dict] = []
    done = asyncio.Event()

    async def follow() -> None:
        async for event in client.events(rate_hz=1.0):
            if event["type"] == "migration" and event["migration"]["vm"] == "figs":
                updates.append(event["migration"])
                if event["migration"]["state"] in ("completed", "failed"):
                    done.set()
                    return

    follower = asyncio.get_running_loop().create_task(follow())
    await asyncio.sleep(0)
    await client.migrate("figs", "sim-nomte")
    await asyncio.wait_for(done.wait(), 30)
    await follower
    final = updates[-1]
    assert final["state"] == "completed" and final["progress"] == 1.0
    assert_whole_ram_accounted(final["stats"], 64 * MIB)
    [stored] = [m for m in await client.migrations() if m["id"] == final["id"]]
    assert stored["stats"] == final["stats"]

    # (the last "active" update, at 100%, is the host's final report just before "completed")
    active = [m for m in updates if m["state"] == "active" and m["stats"] and m["progress"] < 1.0]
    assert len(active) >= 2, updates
    for m in active:   # the progress shown is the share of RAM already walked (no tags to move here)
        s = m["stats"]
        assert m["progress"] == 0.99 * (s["ram_total"] - s["ram_remaining"]) / s["ram_total"]
    walked = [m["stats"]["ram_total"] - m["stats"]["ram_remaining"] for m in active]
    assert walked == sorted(walked) and 0 < walked[0] < 64 * MIB
    await client.stop("figs")


def test_cli_migrations_json_carries_the_ram_figures(run_mtevm, mtevm_daemon):
    def ok(*args):
        r = run_mtevm(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    ok("create", "tagged", "--memory", "128M")
    ok("start", "tagged")
    m = ok("migrate", "tagged", "--to", "sim-mte", "--with-tags")
    assert m["state"] == "completed"
    [listed] = ok("migrations")
    assert listed["stats"] == m["stats"]
    assert_whole_ram_accounted(listed["stats"], 128 * MIB)
    assert listed["stats"]["tags_verified"] > 0
    ok("stop", "tagged")
