"""``mtevm tagcheck replay``: the trace format, the output JSON, and errors -- through the real CLI."""
import json
import subprocess
import sys

import pytest

from backend.tagcheck.replay import TraceError, replay

T = 0x0300000000000000      # logical tag 3 in bits 59:56


def run_cli(tmp_path, lines, *args, module=True):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x + "\n" for x in lines))
    cmd = ([sys.executable, "-m", "backend.tagcheck.replay"] if module else
           [sys.executable, "-m", "backend.cli", "tagcheck", "replay"])
    return subprocess.run(cmd + [str(trace), *args], capture_output=True, text=True, timeout=60)


TRACE = [
    {"op": "stg", "addr": "0x40000010", "tag": 3},                  # 0
    {"op": "st2g", "addr": 0x40000FF0, "tag": 3},                   # 1: also tags 0x40001000
    {"op": "load", "ptr": hex(T | 0x40000010), "size": 16},         # 2: ok
    {"op": "load", "ptr": hex(T | 0x4000000C), "size": 8},          # 3: sync, 1st granule: ptr as given
    {"op": "store", "ptr": hex(T | 0x40001008), "size": 16},        # 4: sync, 2nd granule 0x40001010
    {"op": "ldg", "addr": "0x40001004"},                            # 5: 3
    {"op": "config", "tcf": "async"},                               # 6
    {"op": "store", "ptr": hex(T | 0x40000020), "size": 4},         # 7: async
    {"op": "store", "ptr": hex(T | 0x40000020), "size": 4},         # 8: async again (TFSR cleared after 7)
    {"op": "load", "ptr": hex(T | 0x40000010), "size": 4},          # 9: ok, nothing reported
    {"op": "config", "tcf": "asymm"},                               # 10
    {"op": "load", "ptr": hex(T | 0x40000020), "size": 2},          # 11: sync
    {"op": "store", "ptr": hex(T | 0x40000020), "size": 2},         # 12: async
    {"op": "config", "tcma": True, "tcf": "sync"},                  # 13
    {"op": "load", "ptr": "0x40000010", "size": 1},                 # 14: tag 0 pointer: unchecked
    {"op": "config", "tcma": False, "tco": True},                   # 15
    {"op": "load", "ptr": "0x40000010", "size": 1},                 # 16: TCO: unchecked
    {"op": "config", "tco": False},                                 # 17
    {"op": "load", "ptr": "0x40000010", "size": 1},                 # 18: sync
    {"op": "stzg", "addr": "0x40000020", "tag": 3},                 # 19
    {"op": "ldg", "addr": hex(0x0500000040000020)},                 # 20: tag bits of the address ignored
]


def test_replay_json_output_has_the_exact_shape(tmp_path):
    p = run_cli(tmp_path, TRACE, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["faults"] == [
        {"i": 3, "kind": "sync", "addr": "0x4000000c"},
        {"i": 4, "kind": "sync", "addr": "0x40001010"},
        {"i": 7, "kind": "async", "addr": None},
        {"i": 8, "kind": "async", "addr": None},
        {"i": 11, "kind": "sync", "addr": "0x40000020"},
        {"i": 12, "kind": "async", "addr": None},
        {"i": 18, "kind": "sync", "addr": "0x40000010"},
    ]
    assert out["ldg"] == [{"i": 5, "tag": 3}, {"i": 20, "tag": 3}]
    c = out["counters"]
    assert (c["sync_faults"], c["async_faults"], c["checked"], c["unchecked"]) == (4, 3, 9, 2)
    assert (c["loads"], c["stores"], c["tag_stores"], c["ldg"]) == (7, 4, 3, 2)
    assert set(out) == {"faults", "ldg", "counters"}


def test_replay_through_the_mtevm_cli(tmp_path):
    p = run_cli(tmp_path, TRACE[:5], "--json", module=False)
    assert p.returncode == 0, p.stderr
    assert [f["i"] for f in json.loads(p.stdout)["faults"]] == [3, 4]


def test_replay_table_output_is_readable(tmp_path):
    p = run_cli(tmp_path, TRACE)
    assert p.returncode == 0, p.stderr
    assert "0x40001010" in p.stdout and "async" in p.stdout and "sync_faults" in p.stdout
    assert not p.stdout.lstrip().startswith("{")


@pytest.mark.parametrize("bad,why", [
    ('{"op":"load","ptr":1', "not valid JSON"),
    ('{"op":"jump","addr":1}', 'unknown op "jump"'),
    ('{"addr":1}', 'missing "op"'),
    ('[1,2]', "JSON object"),
    ('{"op":"load","ptr":"0x40000000"}', "missing field size"),
    ('{"op":"load","ptr":"0x40000000","size":3}', "size: 3 is not one of 1, 2, 4, 8, 16"),
    ('{"op":"load","ptr":"1073741824","size":8}', "not an integer"),
    ('{"op":"load","ptr":"0xZZ","size":8}', "not a hexadecimal number"),
    ('{"op":"load","ptr":true,"size":8}', "not an integer"),
    ('{"op":"stg","addr":"0x40000000","tag":16}', "tag: 16 is not 0..15"),
    ('{"op":"stg","addr":"0x40000008","tag":1}', "not 16-byte aligned"),
    ('{"op":"load","ptr":"0x10","size":8}', "outside guest RAM"),
    ('{"op":"config","tcf":"strict"}', "tcf"),
    ('{"op":"config","tco":1}', "tco: 1 is not true or false"),
    ('{"op":"ldg","addr":"0x40000000","tag":1}', "unknown field tag"),
])
def test_malformed_line_gives_its_number_and_prints_no_result(tmp_path, bad, why):
    p = run_cli(tmp_path, [TRACE[0], "", bad, TRACE[2]], "--json")
    assert p.returncode == 2
    assert p.stdout == ""
    assert "line 3:" in p.stderr and why in p.stderr


def test_missing_trace_file_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "backend.tagcheck.replay", str(tmp_path / "nope.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and "cannot read" in p.stderr


def test_ram_base_and_size_options(tmp_path):
    lines = [{"op": "stg", "addr": "0x80001000", "tag": 2}, {"op": "load", "ptr": "0x80001000", "size": 8}]
    p = run_cli(tmp_path, lines, "--json", "--ram-base", "0x80000000", "--ram-size", "1M")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["faults"] == [{"i": 1, "kind": "sync", "addr": "0x80001000"}]
    p = run_cli(tmp_path, lines, "--json", "--ram-size", "1M")    # default base 0x40000000
    assert p.returncode == 2 and "line 1:" in p.stderr and "outside guest RAM" in p.stderr
    p = run_cli(tmp_path, lines, "--ram-size", "lots")
    assert p.returncode == 2 and "lots" in p.stderr


def test_replay_api_raises_trace_error_with_line_number():
    with pytest.raises(TraceError) as e:
        replay(['{"op":"config"}', '{"op":"nope"}'])
    assert e.value.line_no == 2 and str(e.value).startswith("line 2: unknown op")
    result = replay([json.dumps(x) for x in TRACE[:4]])
    assert result.to_json()["faults"] == [{"i": 3, "kind": "sync", "addr": "0x4000000c"}]


def _one_line_exit_2(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr[-2000:])
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    return p.stderr.strip()


def test_deeply_nested_json_is_a_one_line_error_not_a_traceback(tmp_path):
    nested = "[" * 100_000 + "]" * 100_000
    err = _one_line_exit_2(run_cli(tmp_path, ['{"op":"ldg","addr":"0x40000000"}', nested]))
    assert err.endswith("line 2: not usable JSON (nested too deeply (more than 64 levels))")


def test_a_trace_that_is_not_utf8_names_its_line(tmp_path):
    trace = tmp_path / "bin.jsonl"
    trace.write_bytes(b'{"op":"ldg","addr":"0x40000000"}\n\xff\xfe\n')
    p = subprocess.run([sys.executable, "-m", "backend.cli", "tagcheck", "replay", str(trace)],
                       capture_output=True, text=True, timeout=60)
    assert _one_line_exit_2(p).endswith("line 2: not UTF-8 text")


def test_replay_streams_its_trace_a_bad_line_is_reported_while_the_writer_still_writes():
    """The trace is read line by line: the first bad line ends the replay at once, without waiting
    for (or holding) the rest of a trace that may be endless or larger than memory."""
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "tagcheck", "replay", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write('{"op":"ldg","addr":"0x40000000"}\n{"op":"jump"}\n')
        proc.stdin.flush()                       # and the writer keeps the pipe open
        assert proc.wait(timeout=60) == 2        # a replay that reads to EOF first never gets here
        assert "line 2: unknown op \"jump\"" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
