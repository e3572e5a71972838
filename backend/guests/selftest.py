"""``mtevm selftest``: the kernel's arm64/mte selftests, run in a Linux guest through its agent.

The guest image holds the tests in /opt/mtevm/selftests and their list (default-run order; a line
``NAME  # slow: why`` is opt-in, run only when named). Each test prints TAP; every ``ok`` /
``not ok`` line is reported as it arrives, and the test's exit status (kselftest: 0 pass, 4 skip,
else fail) decides its result.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from backend.errors import ConfigError

SELFTEST_DIR = "/opt/mtevm/selftests"
KSFT_SKIP = 4
_TAP = re.compile(r"^(not ok|ok)\s+(\d+)\s*-?\s*(.*?)\s*$")


@dataclass
class TestInfo:
    name: str
    slow: str | None = None     # why it is opt-in, or None for a default test


def parse_list(text: str) -> list[TestInfo]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, comment = line.partition("#")
        comment = comment.strip()
        out.append(TestInfo(name.strip(), comment.split(":", 1)[1].strip() if comment.startswith("slow") else None))
    return out


def tap_case(line: str) -> dict | None:
    """One TAP result line -> {"number", "result": pass|fail|skip, "description"}; else None."""
    m = _TAP.match(line)
    if not m:
        return None
    status, number, desc = m.groups()
    skip = re.search(r"#\s*SKIP", desc, re.IGNORECASE)
    result = "skip" if skip else ("pass" if status == "ok" else "fail")
    return {"number": int(number), "result": result, "description": desc}


@dataclass
class TestResult:
    name: str
    result: str = "running"        # pass | fail | skip | running
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    status: int | None = None
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "result": self.result, "pass": self.passed, "fail": self.failed,
                "skip": self.skipped, "status": self.status, "seconds": round(self.seconds, 3)}


async def list_tests(client, vm: str) -> list[TestInfo]:
    out = b""
    async for msg in client.exec(vm, [f"{SELFTEST_DIR}/list"], path="/bin/cat"):
        if msg["type"] == "exec-output" and msg["stream"] == "stdout":
            out += msg["data"]
    return parse_list(out.decode(errors="replace"))


def choose(available: list[TestInfo], wanted: list[str]) -> list[str]:
    """The tests to run: the named ones (slow ones included), else every default (not slow) one."""
    names = [t.name for t in available]
    if not wanted:
        return [t.name for t in available if t.slow is None]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ConfigError(f"no selftest named {', '.join(unknown)} in the guest (it has: {', '.join(names)})")
    return list(wanted)


async def run_tests(client, vm: str, names: list[str]) -> AsyncIterator[tuple[str, TestResult, dict | None]]:
    """Run ``names`` one after the other; yields ("case", result, case) for each TAP line and
    ("done", result, None) when a test ends."""
    for name in names:
        r = TestResult(name)
        t0 = time.monotonic()
        partial = {"stdout": "", "stderr": ""}
        seen: set[int] = set()
        async for msg in client.exec(vm, [], path=f"{SELFTEST_DIR}/{name}", cwd=SELFTEST_DIR):
            if msg["type"] == "exec-output":
                stream = msg.get("stream", "stdout")
                text = partial.get(stream, "") + msg["data"].decode(errors="replace")
                *lines, partial[stream] = text.split("\n")
                for line in lines:
                    r.output.append(line)
                    case = tap_case(line)
                    # check_gcr_el1_cswitch's forks repeat the parent's buffered lines: count each case once
                    if case is None or case["number"] in seen:
                        continue
                    seen.add(case["number"])
                    if case["result"] == "pass":
                        r.passed += 1
                    elif case["result"] == "fail":
                        r.failed += 1
                    else:
                        r.skipped += 1
                    yield "case", r, case
            elif msg["type"] == "exec-exit":
                r.status = msg.get("status")
                signal = msg.get("signal")
                if signal:
                    r.result = "fail"
                    r.output.append(f"killed by signal {signal}")
                elif r.status == 0 and not r.failed:
                    r.result = "pass"
                elif r.status == KSFT_SKIP and not r.failed:
                    r.result = "skip"
                else:
                    r.result = "fail"
        r.seconds = time.monotonic() - t0
        yield "done", r, None
