"""The Linux guest image in a bare ``qemu-system-aarch64`` (no mtevm host code), for guest-side tests
and benchmarks: the protocol's virtio-serial port on a Unix socket, the console in a file, and a
JSON-lines client for the agent. Whoever starts a BareLinux stops it (by PID, in ``stop``)."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from backend.guests.linux.image import BuiltImage

PORT_NAME = "org.mtevm.agent.0"


def qemu_argv(image: BuiltImage, agent_sock: str, console_log: str, smp: int = 2, memory: str = "512M",
              append: str = "") -> list[str]:
    """The bare command line of the notes: -nic none (no efi-virtio.rom), raw Image, gzip initramfs."""
    return ["qemu-system-aarch64", "-M", "virt,mte=on", "-cpu", "max,pauth-impdef=on", "-accel", "tcg",
            "-smp", str(smp), "-m", memory, "-display", "none", "-nic", "none", "-no-reboot",
            "-kernel", image.kernel, "-initrd", image.initrd,
            "-append", f"console=ttyAMA0 panic=-1 quiet {append}".strip(),
            "-serial", f"file:{console_log}",
            "-device", "virtio-serial-device",
            "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
            "-chardev", f"socket,id=agent,path={agent_sock},server=on,wait=off"]


class AgentLink:
    """One connection to the agent's port: send objects, read objects (non-JSON lines are skipped)."""

    def __init__(self, path: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""

    def send(self, msg: dict) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the agent")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the agent's port closed")
            self.buf += data

    def wait_for(self, mtype: str, timeout: float = 60.0, seen: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if seen is not None:
                seen.append(msg)
            if msg.get("type") == mtype:
                return msg

    def hello(self, timeout: float = 60.0) -> dict:
        self.send({"type": "hello"})
        return self.wait_for("hello", timeout)

    def run(self, msg_id, timeout: float = 120.0, **exec_fields) -> dict:
        """exec and collect: {'started', 'exit', 'stdout', 'stderr', 'error', 'messages'}."""
        self.send({"type": "exec", "id": msg_id, **exec_fields})
        out = {"stdout": b"", "stderr": b"", "messages": [], "started": None, "exit": None, "error": None}
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(0.01, deadline - time.monotonic()))
            out["messages"].append(m)
            if m.get("id") != msg_id:
                continue
            if m["type"] == "exec-started":
                out["started"] = m
            elif m["type"] == "exec-output":
                out[m["stream"]] += base64.b64decode(m["data"])
            elif m["type"] == "exec-exit":
                out["exit"] = m
                return out
            elif m["type"] == "error":
                out["error"] = m
                return out

    def close(self) -> None:
        self.sock.close()


class BareLinux:
    def __init__(self, image: BuiltImage, smp: int = 2, memory: str = "512M", append: str = ""):
        # A short private dir: Unix socket paths are limited to 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="mtevm-bare-")
        self.agent_sock = os.path.join(self.dir, "agent.sock")
        self.console_log = os.path.join(self.dir, "console.log")
        self.argv = qemu_argv(image, self.agent_sock, self.console_log, smp, memory, append)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> "BareLinux":
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "qemu.err"), "wb"))
        return self

    def connect(self, timeout: float = 60.0) -> AgentLink:
        return AgentLink(self.agent_sock, timeout)

    def console(self) -> str:
        try:
            with open(self.console_log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float = 120.0) -> float:
        """Seconds from launch until ``text`` appears on the console."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}): {open(os.path.join(self.dir, 'qemu.err')).read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not on the console after {timeout} s:\n{self.console()[-2000:]}")
            time.sleep(0.02)
        return time.monotonic() - self.started_at

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def booted(image: BuiltImage, smp: int = 2, append: str = ""):
    """(vm, link): booted to /init's first line, the agent answering; QEMU stopped at exit."""
    vm = BareLinux(image, smp=smp, append=append).start()
    try:
        vm.wait_console("mtevm: init ready")
        link = vm.connect()
        link.hello()
        yield vm, link
        link.close()
    finally:
        vm.stop()
