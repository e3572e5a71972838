"""LiveDataTable draws exactly what Textual's DataTable draws, though it repaints one cell per change
and keeps rendered cells by their text (tui/components/live_table.py): the same script of cell
changes, cursor moves, scrolling and a theme change, run on both, gives the same lines, segment by
segment (text and style)."""
from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import DataTable

from tui.components.live_table import LiveDataTable

ROWS, COLUMNS = 40, [("name", 8), ("state", 9), ("faults", 6)]


class TableApp(App):
    def __init__(self, table_class) -> None:
        super().__init__()
        self.table_class = table_class

    def compose(self) -> ComposeResult:
        yield self.table_class(id="t", cursor_type="row", zebra_stripes=True)


def drawn(table) -> list[list[tuple]]:
    """Every line the table draws now: (text, style) per segment."""
    return [[(seg.text, seg.style) for seg in table.render_line(y)] for y in range(table.size.height)]


async def run_script(table_class) -> list[list[list[tuple]]]:
    """Drive one table through the script; what it drew after each step."""
    app = TableApp(table_class)
    frames = []
    async with app.run_test(size=(40, 12)) as pilot:
        table = app.query_one("#t")
        for key, width in COLUMNS:
            table.add_column(key, key=key, width=width)
        for i in range(ROWS):
            table.add_row(f"vm{i:02d}", "running", "0", key=f"vm{i:02d}")
        table.focus()

        def change(row: str, column: str, text: str) -> None:
            if isinstance(table, LiveDataTable):
                table.set_cell(row, column, text)
            else:
                table.update_cell(row, column, text)

        async def frame() -> None:
            await pilot.pause()
            frames.append(drawn(table))

        await frame()
        change("vm02", "faults", "12.5")          # one figure changes
        await frame()
        change("vm02", "faults", "0")             # and back: the text it had, drawn as before
        change("vm03", "state", "paused")
        await frame()
        await pilot.press("down", "down", "down")   # the cursor row: highlighted cells
        await frame()
        change("vm03", "faults", "7")             # a change on the cursor row
        await frame()
        table.scroll_to(y=20, animate=False)
        change("vm25", "state", "stopped")
        await frame()
        app.theme = "textual-light"               # a theme change: every cell in new colours
        await frame()
        table.blur()                              # unfocused: the cursor is drawn differently
        await frame()
    return frames


async def test_the_live_table_draws_what_a_data_table_draws():
    live, reference = await run_script(LiveDataTable), await run_script(DataTable)
    assert len(live) == len(reference) == 8
    for step, (got, want) in enumerate(zip(live, reference)):
        assert got == want, f"step {step}: the live table drew something else"
    # The script really changed what was drawn (a cell, the cursor, the theme): no step is the one before.
    assert all(a != b for a, b in zip(reference, reference[1:]))
    text = ["".join(t for t, _ in line) for line in live[1]]
    assert any("vm02" in line and "12.5" in line for line in text)
