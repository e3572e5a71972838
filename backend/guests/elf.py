"""Is a host file something the Linux guest can run? (``mtevm exec`` checks before it sends.)

The guest has no dynamic loader or shared libraries: only a static aarch64 ELF (ET_EXEC, or a
static-pie ET_DYN without PT_INTERP) runs there.
"""
from __future__ import annotations

import os
import struct

from backend.errors import ConfigError

MAX_PROGRAM = 32 << 20           # the agent's limit (docs/agent-protocol.md)
EM_AARCH64 = 183
ET_EXEC, ET_DYN = 2, 3
PT_INTERP = 3
MACHINES = {3: "x86 (i386)", 62: "x86-64", 40: "32-bit Arm", 243: "RISC-V", 8: "MIPS", 20: "PowerPC",
            21: "PowerPC64", 22: "s390"}


def check_static_aarch64(path: str) -> bytes:
    """The file's bytes if it is a static little-endian aarch64 ELF executable, else ConfigError
    saying what it is instead."""
    try:
        size = os.path.getsize(path)
        if size > MAX_PROGRAM:
            raise ConfigError(f"{path}: {size} bytes is too big to run in the guest (at most {MAX_PROGRAM} bytes)")
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a program") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if data[:4] != b"\x7fELF":
        kind = "a script" if data[:2] == b"#!" else "not an ELF file"
        raise ConfigError(f"{path}: not an aarch64 ELF program ({kind}); build it with "
                          "aarch64-linux-gnu-gcc -static")
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise ConfigError(f"{path}: not an aarch64 ELF program (not a 64-bit little-endian ELF)")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_AARCH64:
        raise ConfigError(f"{path}: not an aarch64 ELF program (it is for {MACHINES.get(e_machine, f'machine {e_machine}')})")
    if e_type not in (ET_EXEC, ET_DYN):
        raise ConfigError(f"{path}: an aarch64 ELF file but not a program (e_type {e_type}: an object file or core dump?)")
    e_phoff, = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + 4 > len(data):
            raise ConfigError(f"{path}: a truncated ELF file (program header {i} is past its end)")
        if struct.unpack_from("<I", data, off)[0] == PT_INTERP:
            raise ConfigError(f"{path}: a dynamically linked program; the guest has no shared libraries: "
                              "link it with -static")
    return data
