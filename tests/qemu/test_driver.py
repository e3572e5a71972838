"""The QEMU driver against real qemu-system-aarch64 processes (no guest needed: QEMU runs without
a kernel). What a user relies on: QEMU's own start-up errors verbatim, no stray QEMU after a failed
start or a stop, a killed QEMU noticed, and a QEMU found again by a new daemon.
"""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from backend.errors import ConfigError, RealizeError
from backend.qemu.argv import build_argv, format_memory, validate_extra_args, LaunchFiles
from backend.qemu.driver import KEEP_LOGS, QemuFiles, QemuProcess, StopTimeouts, proc_start_time, qemus_mentioning

pytestmark = pytest.mark.qemu


def argv_for(files: QemuFiles, cpu: str = "max", *extra: str) -> list[str]:
    return ["qemu-system-aarch64", "-M", "virt,mte=on", "-cpu", cpu, "-accel", "tcg", "-nodefaults",
            "-display", "none", "-smp", "1", "-m", "128M",
            "-qmp", f"unix:{files.qmp_socket},server=on,wait=off", *extra]


def assert_gone(pid: int) -> None:
    assert not os.path.exists(f"/proc/{pid}"), f"QEMU pid {pid} is still there (not reaped?)"


@pytest.fixture
async def qemu(tmp_path):
    """Launch QEMUs for a test and make sure every one is gone afterwards (by PID)."""
    started: list[QemuProcess] = []

    async def launch(*extra: str, cpu: str = "max") -> QemuProcess:
        files = QemuFiles.new(str(tmp_path / "run"))
        proc = await QemuProcess.launch(argv_for(files, cpu, *extra), files)
        started.append(proc)
        return proc

    yield launch
    for proc in started:
        if proc_start_time(proc.pid) == proc.start_time:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait(5)
        assert proc_start_time(proc.pid) != proc.start_time


async def test_launch_reaches_qmp_and_stop_leaves_nothing(qemu):
    proc = await qemu()
    assert (await proc.qmp.execute("query-status"))["status"] == "running"
    assert [c["cpu-index"] for c in await proc.qmp.execute("query-cpus-fast")] == [0]
    assert os.path.exists(proc.files.qmp_socket)
    await proc.stop()
    assert not proc.alive()
    assert proc.returncode == 0           # QMP quit: a clean exit
    assert_gone(proc.pid)
    assert not os.path.exists(proc.files.qmp_socket)


async def test_qemu_startup_error_reaches_the_user_verbatim(tmp_path):
    files = QemuFiles.new(str(tmp_path))
    with pytest.raises(RealizeError) as err:
        await QemuProcess.launch(argv_for(files, "cortex-a57"), files)
    assert str(err.value) == "qemu-system-aarch64: MTE requested, but not supported by the guest CPU"
    assert qemus_mentioning(files.qmp_socket) == []
    assert not os.path.exists(files.qmp_socket)


async def test_only_migratable_refusal_is_qemus_text(tmp_path):
    files = QemuFiles.new(str(tmp_path))
    shm = f"/dev/shm/mtevm-test-{files.launch_id}"
    extra = ["-object", f"memory-backend-file,id=shm,mem-path={shm},size=1M,share=on",
             "-device", "ivshmem-plain,memdev=shm", "-only-migratable"]
    try:
        with pytest.raises(RealizeError) as err:
            await QemuProcess.launch(argv_for(files, "max", *extra), files)
    finally:
        if os.path.exists(shm):
            os.unlink(shm)
    assert str(err.value).endswith(
        "disallowing migration blocker (--only-migratable) for: Migration is disabled when using "
        "feature 'peer mode' in device 'ivshmem'")
    assert str(err.value).startswith("qemu-system-aarch64: -device ivshmem-plain,memdev=shm: ")
    assert qemus_mentioning(files.qmp_socket) == []


async def test_a_missing_binary_is_a_clear_error(tmp_path):
    files = QemuFiles.new(str(tmp_path))
    with pytest.raises(RealizeError, match="cannot run /nonexistent/qemu-system-aarch64"):
        await QemuProcess.launch(["/nonexistent/qemu-system-aarch64"], files)


async def test_a_killed_qemu_is_noticed_with_its_reason(qemu):
    proc = await qemu()
    seen = []
    proc.on_exit(seen.append)
    os.kill(proc.pid, signal.SIGKILL)       # as the OOM killer or a user would
    assert await proc.wait(10)
    assert seen == [proc]
    assert not proc.stopping
    assert proc.exit_reason() == "QEMU was killed by SIGKILL"
    assert_gone(proc.pid)


async def test_stop_escalates_to_sigkill_when_qemu_does_not_answer(qemu):
    proc = await qemu()
    os.kill(proc.pid, signal.SIGSTOP)       # frozen: ignores QMP quit and (pending) SIGTERM
    await proc.stop(StopTimeouts(quit=0.3, term=0.3, kill=10))
    assert proc.returncode == -signal.SIGKILL
    assert_gone(proc.pid)


async def test_stop_without_qmp_uses_sigterm_at_once(qemu):
    proc = await qemu()
    await proc.qmp.close()                  # no QMP: quit cannot be sent, SIGTERM must do it
    await proc.stop(StopTimeouts(quit=0.3, term=10, kill=10))
    assert proc.returncode == 0             # QEMU shuts down cleanly on SIGTERM
    assert "terminating on signal 15" in "\n".join(proc.stderr_tail())
    assert_gone(proc.pid)


async def test_reattach_finds_a_running_qemu_and_refuses_a_reused_pid(qemu):
    proc = await qemu()
    runtime = proc.runtime_info()
    await proc.detach()                     # the daemon goes away; QEMU keeps running
    assert proc_start_time(proc.pid) == proc.start_time

    stale = dict(runtime, start_time=runtime["start_time"] - 1)   # same pid, another process
    assert await QemuProcess.reattach(stale) is None

    again = await QemuProcess.reattach(runtime)
    assert again is not None and again.pid == proc.pid
    assert (await again.qmp.execute("query-status"))["status"] == "running"
    await again.stop()
    assert_gone(proc.pid)
    assert await QemuProcess.reattach(runtime) is None   # gone: nothing to reattach


async def test_a_long_runtime_dir_still_gets_a_qmp_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    files = QemuFiles.new(str(deep))
    assert files.socket_dir is not None and len(files.qmp_socket) <= 107
    proc = await QemuProcess.launch(argv_for(files), files)
    try:
        assert (await proc.qmp.execute("query-status"))["status"] == "running"
    finally:
        await proc.stop()
    assert_gone(proc.pid)
    assert not os.path.exists(files.socket_dir)


async def test_a_cancelled_launch_leaves_no_qemu(tmp_path):
    files = QemuFiles.new(str(tmp_path))
    task = asyncio.create_task(QemuProcess.launch(argv_for(files), files))
    await asyncio.sleep(0.01)               # QEMU is starting, QMP not yet ready (or just ready)
    task.cancel()
    try:
        proc = await task
    except asyncio.CancelledError:
        proc = None
    if proc is not None:                    # it won the race: then stop must clean up
        await proc.stop()
    assert qemus_mentioning(files.qmp_socket) == []


def test_extra_args_are_validated():
    assert validate_extra_args(None) == []
    assert validate_extra_args(["-device", "ivshmem-plain,memdev=shm"]) == ["-device", "ivshmem-plain,memdev=shm"]
    for bad, text in [("-device x", "give a list"), (["-device"], "has no value"),
                      (["-qmp", "unix:/x"], "'-qmp' is not allowed"),
                      (["-device", "-incoming"], "needs a value"), (["-object", "a\nb"], "needs a value")]:
        with pytest.raises(ConfigError, match=text):
            validate_extra_args(bad)


@pytest.mark.parametrize("opt,value,named", [
    ("-object", "memory-backend-file,id=m,mem-path=/home/u/.bashrc,share=on", "mem-path=/home/u/.bashrc"),
    ("-device", "loader,file=/etc/shadow,addr=0x40000000", "file=/etc/shadow"),
    ("-object", "secret,id=s,file=/root/.ssh/id_ed25519", "file=/root/.ssh/id_ed25519"),
    ("-object", "tls-creds-x509,id=t,dir=/etc/ssl,endpoint=client", "dir=/etc/ssl"),
    ("-object", "rng-random,id=r,filename=/etc/shadow", "filename=/etc/shadow"),
    ("-object", "filter-dump,id=f,netdev=n,file=/etc/passwd", "file=/etc/passwd"),
    ("-object", "input-linux,id=i,evdev=/dev/input/event0", "evdev=/dev/input/event0"),
    ("-device", "virtio-net-pci,romfile=/tmp/x,,y", "romfile=/tmp/x,y"),      # ",," is QEMU's comma
    ("-device", "guest-loader,addr=0x1000,kernel=/boot/vmlinuz", "kernel=/boot/vmlinuz"),
    ("-device", "usb-mtp,rootdir=/home", "rootdir=/home"),
    ("-device", "usb-host,hostdevice=/dev/bus/usb/001/002", "hostdevice=/dev/bus/usb/001/002"),
    ("-device", "vfio-pci,host=0000:00:01.0", "host=0000:00:01.0"),
    ("-device", "usb-host", "usb-host"),
    ("-object", '{"qom-type": "secret", "id": "s", "file": "/etc/shadow"}', "file=/etc/shadow"),
    ("-object", "memory-backend-file,id=m,x-future-file-prop=/x", "x-future-file-prop=/x"),
])
def test_qemu_args_that_name_host_files_need_the_opt_in(opt, value, named):
    with pytest.raises(ConfigError, match="--allow-host-files") as err:
        validate_extra_args([opt, value])
    assert named in str(err.value) and "read or overwrite any file you can" in str(err.value)
    assert validate_extra_args([opt, value], allow_host_files=True) == [opt, value]


def test_qemu_args_without_host_files_need_no_opt_in():
    for args in (["-object", "memory-backend-memfd,id=m,size=1M,share=on", "-device", "ivshmem-plain,memdev=m"],
                 ["-object", "memory-backend-ram,id=r,size=1M"], ["-device", "virtio-net-pci,romfile="],
                 ["-device", "pci-testdev,addr=0x3"]):
        assert validate_extra_args(args) == args


def test_memory_sizes_in_qemu_syntax():
    assert format_memory(256 << 20) == "256M"
    assert format_memory((256 << 20) + 4096) == f"{(256 << 20) + 4096}B"


def test_argv_from_a_config():
    from backend.machine import VirtMachineConfig
    config = VirtMachineConfig(name="a", vcpus=2, memory=128 << 20, secure=True, only_migratable=True)
    files = LaunchFiles("/run/x,y/qmp.sock", "/g/guest.elf", "/run/p.bin", 0x40200000)
    argv = build_argv(config, files, extra_args=["-device", "foo"], incoming="tcp:127.0.0.1:5555")
    assert argv == ["qemu-system-aarch64", "-M", "virt,mte=on,secure=on", "-cpu", "max", "-accel", "tcg",
                    "-nodefaults", "-nic", "none", "-display", "none", "-smp", "2", "-m", "128M",
                    "-kernel", "/g/guest.elf",
                    "-qmp", "unix:/run/x,,y/qmp.sock,server=on,wait=off",
                    "-device", "loader,file=/run/p.bin,addr=0x40200000,force-raw=on",
                    "-only-migratable", "-device", "foo", "-incoming", "tcp:127.0.0.1:5555"]


def test_a_new_launch_prunes_the_logs_of_ended_launches_but_keeps_the_newest(tmp_path):
    """A VM restarted many times keeps the last KEEP_LOGS QEMU logs of ended launches (and every
    live QEMU's log, which has its launch record), not one log per start for ever."""
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir(mode=0o700)
    ended = [f"qemu-{i:08x}.log" for i in range(6)]
    for age, name in enumerate(reversed(ended)):          # ended[5] is the newest
        (vm_dir / name).write_text("old\n")
        os.utime(vm_dir / name, (1000 - age, 1000 - age))
    (vm_dir / "qemu-live0000.log").write_text("running\n")  # the oldest, but its QEMU still runs
    os.utime(vm_dir / "qemu-live0000.log", (1, 1))
    (vm_dir / "launch-live0000.json").write_text("{}")
    QemuFiles.new(str(vm_dir))
    left = sorted(p.name for p in vm_dir.iterdir() if p.suffix == ".log")
    assert left == sorted(ended[-KEEP_LOGS:] + ["qemu-live0000.log"])
