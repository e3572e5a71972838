"""The app's create form for a local VM's guest (builtin, linux, custom): the same checks as
``mtevm create --guest``, shown as you type, and the guest in the VM's detail."""
from __future__ import annotations

from tests.guests.conftest import linux_image  # noqa: F401 (the built image: a linux guest needs it)
from tests.guests.test_definition import arm64_image
from tests.tui.pilot_helpers import form_message, open_detail, open_form_and_name, screen_text, started, wait_for
from tui.screens.vm_form import VmFormScreen
from tui.screens.vm_list import VmListScreen

SIZE = (100, 40)


async def choose_local_host(pilot, app) -> None:
    hosts = [h["name"] for h in await app.client.hosts()]
    await pilot.press("tab", "enter", *["down"] * (hosts.index("local") - hosts.index("sim-mte")), "enter")
    await wait_for(pilot, lambda: app.screen.query_one("#guest-row").display, "the guest rows for local")


async def test_a_custom_kernel_from_the_form(make_app, tmp_path):
    image = arm64_image(tmp_path / "Image")
    not_image = tmp_path / "README"
    not_image.write_text("not a kernel\n" * 10)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "k1")
        assert not app.screen.query_one("#guest-row").display          # a simulated host boots no kernel
        await choose_local_host(pilot, app)
        assert not app.screen.query_one("#fault-address-row").display     # a linux guest's switch
        app.screen.query_one("#guest").value = "custom"
        await wait_for(pilot, lambda: "--guest custom needs --kernel" in form_message(app), "a kernel is needed")
        app.screen.query_one("#kernel").focus()
        await pilot.press(*str(not_image))
        await wait_for(pilot, lambda: "not an arm64 kernel Image" in form_message(app), "the magic is checked")
        app.screen.query_one("#kernel").value = image
        app.screen.query_one("#append").value = "console=ttyAMA0 loglevel=8"
        await wait_for(pilot, lambda: "ready to create" in form_message(app), "a valid custom guest")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen) and "k1" in app.model.vms, "made")
        assert (await app.client.show("k1"))["guest"] == {"kind": "custom", "kernel": image,
                                                          "append": "console=ttyAMA0 loglevel=8"}
        await open_detail(pilot, app)
        await wait_for(pilot, lambda: f"guest custom  kernel {image}" in screen_text(app), "the guest in the detail")


async def test_a_linux_guest_from_the_form_with_fault_addresses_on_or_off(make_app, linux_image):  # noqa: F811
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "lx1")
        await choose_local_host(pilot, app)
        switch = app.screen.query_one("#fault_address")
        assert not app.screen.query_one("#fault-address-row").display
        app.screen.query_one("#guest").value = "linux"
        await wait_for(pilot, lambda: app.screen.query_one("#fault-address-row").display, "the fault-address switch")
        assert switch.value is True and str(switch.label) == "fault addresses: on"     # the default, said
        await wait_for(pilot, lambda: "ready to create" in form_message(app), "a valid linux guest")
        switch.value = False
        await wait_for(pilot, lambda: str(switch.label) == "fault addresses: off", "the switch says off")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen) and "lx1" in app.model.vms, "made")
        assert (await app.client.show("lx1"))["guest"] == {"kind": "linux", "fault_address": False}
        await open_detail(pilot, app)
        await wait_for(pilot, lambda: "guest linux  fault addresses off (--no-fault-address)" in screen_text(app),
                       "the guest and its fault addresses in the detail")
        # The edit form shows the stored choice (a guest is fixed once made: disabled).
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, VmFormScreen), "the edit form")
        switch = app.screen.query_one("#fault_address")
        assert app.screen.query_one("#fault-address-row").display and switch.disabled and switch.value is False
