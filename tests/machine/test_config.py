"""VirtMachineConfig validation: every bad definition gets a message that says what is allowed."""
import pytest
from hypothesis import given, settings, strategies as st

from backend.errors import ConfigError
from backend.machine import CPU_MODELS, VirtMachineConfig, cpu_mte_level, format_size, parse_size


def test_defaults_are_a_valid_mte_machine():
    c = VirtMachineConfig("vm1")
    c.validate()
    assert (c.vcpus, c.memory, c.cpu, c.accel, c.mte, c.secure, c.only_migratable) == \
        (2, 256 << 20, "max", "tcg", True, False, False)


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("1g", 1 << 30), ("2T", 2 << 40), ("64K", 64 << 10),
    ("1.5G", 1536 << 20), ("256MiB", 256 << 20), ("256MB", 256 << 20), (" 1 G ", 1 << 30), ("4096", 4096),
    (268435456, 268435456),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12XB", "", "M", "1.2.3G", "-5M", "one G", None, True, 1.5])
def test_parse_size_rejects_non_sizes(bad):
    with pytest.raises(ConfigError) as e:
        parse_size(bad)
    assert str(e.value).startswith(f"memory {bad!r} is not a size")


def test_parse_size_message_exact():
    with pytest.raises(ConfigError, match=r"^memory '12XB' is not a size: use a number with K, M, G or T, e\.g\. 512M$"):
        parse_size("12XB")


def test_parse_size_rejects_fractional_bytes():
    with pytest.raises(ConfigError, match="not a whole number of bytes"):
        parse_size("1.3K")


@pytest.mark.parametrize("n,text", [(256 << 20, "256M"), (1 << 30, "1G"), (1536 << 20, "1536M"), (1 << 40, "1T"),
                                    (4096, "4K"), (1000, "1000"), (0, "0"), (1536 + (1 << 20), "1.0M")])
def test_format_size(n, text):
    assert format_size(n) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 50).map(lambda n: n * 1024))
def test_format_then_parse_round_trips_whole_kibibytes(n):
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("name", ["a", "vm-1", "web.prod_2", "0day", "x" * 32])
def test_good_names(name):
    VirtMachineConfig(name).validate()


@pytest.mark.parametrize("name", ["", "-vm", ".vm", "VM", "a b", "x" * 33, "vm/1", "ü", 5])
def test_bad_names_say_what_is_allowed(name):
    with pytest.raises(ConfigError) as e:
        VirtMachineConfig(name).validate()
    assert str(e.value) == (f"name {name!r} is not valid: use 1-32 characters of a-z, 0-9, '_', '.', '-', "
                            f"starting with a letter or digit")


@pytest.mark.parametrize("vcpus", [0, 513, -1])
def test_vcpu_range_names_the_limit(vcpus):
    with pytest.raises(ConfigError) as e:
        VirtMachineConfig("vm", vcpus=vcpus).validate()
    assert str(e.value) == f"vcpus {vcpus} is out of range: a virt machine has 1 to 512 vCPUs (the limit with GICv3)"


@pytest.mark.parametrize("vcpus", ["2", 2.0, True])
def test_vcpus_must_be_an_int(vcpus):
    with pytest.raises(ConfigError, match="is not a whole number: use 1 to 512"):
        VirtMachineConfig("vm", vcpus=vcpus).validate()


def test_vcpu_limits_accepted():
    VirtMachineConfig("vm", vcpus=1).validate()
    VirtMachineConfig("vm", vcpus=512).validate()


def test_memory_too_small_and_too_large():
    with pytest.raises(ConfigError, match=r"^memory 16M is too small: use at least 32M$"):
        VirtMachineConfig("vm", memory=16 << 20).validate()
    with pytest.raises(ConfigError, match=r"^memory 2T is too large: use at most 1T$"):
        VirtMachineConfig("vm", memory=2 << 40).validate()
    with pytest.raises(ConfigError, match=r"^memory 'lots' is not a size"):
        VirtMachineConfig("vm", memory="lots").validate()
    with pytest.raises(ConfigError, match="not a whole number of 4K pages"):
        VirtMachineConfig("vm", memory=(64 << 20) + 100).validate()


def test_unknown_cpu_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        VirtMachineConfig("vm", cpu="cortex-x4").validate()
    assert str(e.value) == ("unknown CPU model 'cortex-x4': use one of max, cortex-a710, neoverse-n2, cortex-a35, "
                            "cortex-a53, cortex-a55, cortex-a57, cortex-a72, cortex-a76, neoverse-n1, neoverse-v1, "
                            "a64fx, host")


def test_host_cpu_needs_kvm():
    with pytest.raises(ConfigError, match=r"^The 'host' CPU type can only be used with KVM or HVF$"):
        VirtMachineConfig("vm", cpu="host", accel="tcg").validate()
    VirtMachineConfig("vm", cpu="host", accel="kvm").validate()


@pytest.mark.parametrize("accel", ["", "KVM", "kvm tcg", 3])
def test_bad_accel(accel):
    with pytest.raises(ConfigError, match="is not an accelerator name: use kvm or tcg"):
        VirtMachineConfig("vm", accel=accel).validate()


def test_other_accelerator_names_are_definitions_not_errors():
    VirtMachineConfig("vm", accel="hvf").validate()    # realize decides (QEMU's messages)
    VirtMachineConfig("vm", accel="xen").validate()


def test_flags_must_be_bools():
    with pytest.raises(ConfigError, match=r"^mte 'yes' is not true or false$"):
        VirtMachineConfig("vm", mte="yes").validate()


def test_cpu_mte_levels():
    assert CPU_MODELS["max"] == 3 and cpu_mte_level("cortex-a710") == 2 and cpu_mte_level("neoverse-n2") == 2
    for model in ("cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1", "neoverse-v1", "a64fx"):
        assert cpu_mte_level(model) == 0
    assert cpu_mte_level("host") == -1
    with pytest.raises(ConfigError, match="unknown CPU model"):
        cpu_mte_level("pentium")


def test_dict_round_trip_and_memory_forms():
    c = VirtMachineConfig("db", vcpus=4, memory=1 << 30, cpu="neoverse-n2", accel="kvm", mte=False,
                          secure=True, only_migratable=True)
    d = c.to_dict()
    assert d["memory"] == 1 << 30
    assert VirtMachineConfig.from_dict(d) == c
    assert VirtMachineConfig.from_dict({"name": "a", "memory": "1G"}).memory == 1 << 30
    assert VirtMachineConfig.from_dict({"name": "a", "memory": 512 << 20}).memory == 512 << 20


def test_from_dict_refuses_unknown_keys_and_missing_name():
    with pytest.raises(ConfigError, match=r"^unknown setting\(s\) colour, gpu: use name, vcpus, memory"):
        VirtMachineConfig.from_dict({"name": "a", "gpu": 1, "colour": "red"})
    with pytest.raises(ConfigError, match="a machine needs a name"):
        VirtMachineConfig.from_dict({"vcpus": 2})
    with pytest.raises(ConfigError, match=r"^memory '12XB' is not a size"):
        VirtMachineConfig.from_dict({"name": "a", "memory": "12XB"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        VirtMachineConfig.from_dict(["a"])
