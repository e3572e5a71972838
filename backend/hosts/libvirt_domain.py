"""mtevm's VM definition as a libvirt domain XML, and back.

libvirt has no MTE element (neither 9.0 nor 11.3 knows MTE: not in the domain schema, the QEMU
driver or domcapabilities), so MTE goes in through ``<qemu:commandline>``: QEMU merges repeated
``-machine`` options, and ``-machine mte=on`` after libvirt's own ``-machine virt-...`` turns the
property on (``qom-get /machine mte`` is true, ``info mtree`` shows ``mach-virt.tag``). libvirt
then marks the domain "tainted" (custom-argv): a warning only. The guest (``-kernel``) and its
parameter block (``-device loader``) go the same way, from files mtevm uploads into its storage
pool on the host (``POOL_PATH``), readable by the user QEMU runs as.

mtevm's own data (the definition it made the domain from) lives in the domain's ``<metadata>``
under the ``NAMESPACE`` URI: a domain without it was not made by mtevm and is shown read-only.
This module only builds and parses XML; it imports no libvirt.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from backend.machine import VirtMachineConfig
from backend.qemu import guest_abi
from backend.qemu.argv import format_memory, quote_option

NAMESPACE = "urn:mtevm:domain:1"          # the <metadata> element's namespace (virDomainGetMetadata key)
METADATA_PREFIX = "mtevm"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
POOL_NAME = "mtevm"                       # the storage pool mtevm keeps guest files in, on each host
POOL_PATH = "/var/lib/libvirt/mtevm"

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace(METADATA_PREFIX, NAMESPACE)


def pool_xml() -> str:
    """A directory pool QEMU (user libvirt-qemu) can read files from."""
    return (f"<pool type='dir'><name>{POOL_NAME}</name><target><path>{POOL_PATH}</path>"
            "<permissions><mode>0755</mode></permissions></target></pool>")


def volume_xml(name: str, size: int) -> str:
    """A raw volume readable by everyone (QEMU opens it as libvirt-qemu; libvirt does not relabel
    files it only sees in qemu:commandline)."""
    return (f"<volume><name>{name}</name><capacity unit='bytes'>{max(size, 1)}</capacity>"
            "<target><format type='raw'/><permissions><mode>0644</mode></permissions></target></volume>")


def guest_volume(vm: str) -> str:
    return f"{vm}.guest.elf"


def params_volume(vm: str) -> str:
    return f"{vm}.params.bin"


def kernel_volume(vm: str) -> str:
    return f"{vm}.Image"


def initrd_volume(vm: str) -> str:
    return f"{vm}.initrd"


def volumes(vm: str) -> tuple[str, ...]:
    """Every volume mtevm may have put into the pool for ``vm`` (either guest kind)."""
    return guest_volume(vm), params_volume(vm), kernel_volume(vm), initrd_volume(vm)


def domain_xml(config: VirtMachineConfig, workload: dict, qemu_args: list[str], *, kernel: str,
               params: str | None = None, initrd: str | None = None, cmdline: str | None = None,
               agent_port: str | None = None, uuid: str | None = None) -> str:
    """The persistent domain for ``config``: a virt machine running mtevm's guest, MTE by
    ``-machine mte=on`` (see the module doc), TCG as domain type ``qemu``, KVM as ``kvm``.

    Without ``params`` the guest is a Linux kernel: ``<os><kernel>/<initrd>/<cmdline>`` and, with
    ``agent_port``, a virtio-serial channel of that name (on virtio-mmio, as the local host's
    ``virtio-serial-device``: the guest's initramfs loads virtio_mmio and virtio_console) that the
    host reaches through virDomainOpenChannel."""
    dom = ET.Element("domain", type="kvm" if config.accel == "kvm" else "qemu")
    ET.SubElement(dom, "name").text = config.name
    if uuid:     # redefining keeps the domain's identity
        ET.SubElement(dom, "uuid").text = uuid
    meta = ET.SubElement(dom, "metadata")
    vm = ET.SubElement(meta, f"{{{NAMESPACE}}}vm")
    vm.text = json.dumps({"config": config.to_dict(), "workload": workload, "qemu_args": list(qemu_args)},
                         sort_keys=True)
    ET.SubElement(dom, "memory", unit="b").text = str(config.memory)
    ET.SubElement(dom, "vcpu", placement="static").text = str(config.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="aarch64", machine="virt").text = "hvm"
    if params is None:
        ET.SubElement(os_el, "kernel").text = kernel
        if initrd:
            ET.SubElement(os_el, "initrd").text = initrd
        ET.SubElement(os_el, "cmdline").text = cmdline or ""
    args: list[str] = []
    if config.cpu == "max":
        ET.SubElement(dom, "cpu", mode="maximum", check="none")
    elif config.cpu == "host":
        ET.SubElement(dom, "cpu", mode="host-passthrough", check="none")
    else:
        # libvirt's Arm CPU map lacks most models (cortex-a710, neoverse-n2): QEMU takes the last -cpu.
        args += ["-cpu", config.cpu]
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    # the PL011 on a pty (either guest): mtevm reads it through virDomainOpenConsole
    ET.SubElement(devices, "serial", type="pty")
    if agent_port:
        serial = ET.SubElement(devices, "controller", type="virtio-serial", index="0")
        ET.SubElement(serial, "address", type="virtio-mmio")
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind")
        ET.SubElement(channel, "target", type="virtio", name=agent_port)
        ET.SubElement(channel, "address", type="virtio-serial", controller="0", bus="0", port="1")
    machine = [f"mte={'on' if config.mte else 'off'}"] + (["secure=on"] if config.secure else [])
    args += ["-machine", ",".join(machine)]
    if params is not None:
        args += ["-kernel", kernel,
                 "-device", f"loader,file={quote_option(params)},addr={guest_abi.PARAM_ADDR:#x},force-raw=on"]
    elif config.accel == "tcg" and config.cpu == "max":
        # as the local host: QEMU's own pointer-authentication algorithm is slow under TCG
        args += ["-cpu", "max,pauth-impdef=on"]
    if config.only_migratable:
        args.append("-only-migratable")
    args += list(qemu_args)
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for a in args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=a)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def parse_metadata(text: str | None) -> dict | None:
    """mtevm's definition from a domain's ``<mtevm:vm>`` metadata (None: not an mtevm domain)."""
    if not text:
        return None
    try:
        el = ET.fromstring(text)
        data = json.loads(el.text or "")
    except (ET.ParseError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("config"), dict) else None


# --- snapshots -------------------------------------------------------------------------------------
# A VM's snapshot is a libvirt domain snapshot with an *external memory* file: the domain has no
# disks, so libvirt's internal snapshots (qcow2 savevm) are impossible; QEMU's migration stream to
# the file carries RAM, devices and, under TCG, the mach-virt.tag RAM block (the MTE tags). The
# snapshot's <domain> holds mtevm's <metadata> (the definition it was taken with); mtevm's own
# figures (the counters read as it was taken) go into its <description>, after SNAPSHOT_MARK.
SNAPSHOT_MARK = "mtevm counters: "


def memory_volume(vm: str, tag: str) -> str:
    """The pool volume holding snapshot ``tag``'s memory ('@' is in neither a VM name nor a tag)."""
    return f"{vm}@{tag}.mem"


def snapshot_xml(tag: str, memory_file: str, counters: dict) -> str:
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = tag
    ET.SubElement(snap, "description").text = SNAPSHOT_MARK + json.dumps(counters, sort_keys=True)
    ET.SubElement(snap, "memory", snapshot="external", file=memory_file)
    return ET.tostring(snap, encoding="unicode")


def parse_snapshot(text: str) -> dict:
    """What mtevm shows of a domain snapshot (made by mtevm or by ``virsh snapshot-create``):
    tag, created, the VM's state then, the definition it was taken with (None without mtevm's
    metadata), the memory file (None: no external memory state) and mtevm's counters (None when
    mtevm did not take it)."""
    root = ET.fromstring(text)
    meta = root.find(f"domain/metadata/{{{NAMESPACE}}}vm")
    if meta is None:
        meta = root.find(f"inactiveDomain/metadata/{{{NAMESPACE}}}vm")
    definition = parse_metadata(ET.tostring(meta, encoding="unicode")) if meta is not None else None
    memory = root.find("memory")
    counters = None
    description = root.findtext("description") or ""
    if description.startswith(SNAPSHOT_MARK):
        try:
            counters = json.loads(description[len(SNAPSHOT_MARK):])
        except ValueError:
            counters = None
    return {"tag": root.findtext("name"), "created": float(root.findtext("creationTime") or 0),
            "parent": root.findtext("parent/name"),
            "vm_state": root.findtext("state") or "?", "definition": definition,
            "memory_file": memory.get("file") if memory is not None and memory.get("snapshot") == "external" else None,
            "counters": counters if isinstance(counters, dict) else None}


def summarize_foreign(xml: str) -> dict:
    """What mtevm shows of a domain it did not make: machine, vCPUs, memory, and MTE when its
    command line says so."""
    root = ET.fromstring(xml)
    memory = int(root.findtext("memory") or 0) * 1024     # libvirt reports KiB
    unit = (root.find("memory").get("unit") if root.find("memory") is not None else "KiB") or "KiB"
    if unit.lower() in ("b", "bytes"):
        memory //= 1024
    os_type = root.find("os/type")
    args = [a.get("value", "") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    mte = any("mte=on" in a for a in args)
    cpu = root.find("cpu")
    cpu_name = "-"
    if cpu is not None:
        cpu_name = {"maximum": "max", "host-passthrough": "host"}.get(cpu.get("mode", ""), cpu.findtext("model") or "-")
    return {"accel": "kvm" if root.get("type") == "kvm" else "tcg", "cpu": cpu_name,
            "vcpus": int(root.findtext("vcpu") or 1), "memory": memory, "mte": mte,
            "arch": os_type.get("arch") if os_type is not None else None,
            "machine": os_type.get("machine") if os_type is not None else None}


__all__ = ["NAMESPACE", "POOL_NAME", "POOL_PATH", "domain_xml", "parse_metadata",
           "summarize_foreign", "pool_xml", "volume_xml", "guest_volume", "params_volume", "kernel_volume",
           "initrd_volume", "volumes", "format_memory", "memory_volume", "snapshot_xml", "parse_snapshot"]
