"""LiveDataTable draws exactly what Textual's DataTable draws, though it repaints one cell per change
and keeps rendered cells by their text (tui/components/live_table.py): the same script of cell
changes, cursor moves, scrolling and a theme change, run on both, gives the same lines, segment by
segment (text and style)."""
from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import DataTable

from tui.components.live_table import LiveDataTable, LiveRows

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
        for shift in (2, 1):                      # the same rows in a new order (a sort by faults/s):
            order = [f"vm{(i + shift) % ROWS:02d}" for i in range(ROWS)]    # zebra parity kept, then not
            if isinstance(table, LiveDataTable):
                table.set_order(order)
            else:
                table.sort("name", key=order.index)
            await frame()
        app.theme = "textual-light"               # a theme change: every cell in new colours
        await frame()
        table.blur()                              # unfocused: the cursor is drawn differently
        await frame()
    return frames


async def test_the_live_table_draws_what_a_data_table_draws():
    live, reference = await run_script(LiveDataTable), await run_script(DataTable)
    assert len(live) == len(reference) == 10
    for step, (got, want) in enumerate(zip(live, reference)):
        assert got == want, f"step {step}: the live table drew something else"
    # The script really changed what was drawn (a cell, the cursor, the theme): no step is the one before.
    assert all(a != b for a, b in zip(reference, reference[1:]))
    text = ["".join(t for t, _ in line) for line in live[1]]
    assert any("vm02" in line and "12.5" in line for line in text)


async def test_live_rows_move_the_same_rows_to_a_new_order_in_place_and_the_cursor_follows_its_row():
    app = TableApp(LiveDataTable)
    async with app.run_test(size=(40, 12)) as pilot:
        table = app.query_one("#t")
        rows = LiveRows(table, [(key, key) for key, _ in COLUMNS])

        def values(i: int, faults: str = "0") -> dict[str, str]:
            return {"name": f"vm{i:02d}", "state": "running", "faults": faults}
        assert rows.sync([(f"vm{i:02d}", values(i)) for i in range(ROWS)]) is True      # built
        await pilot.pause()
        table.move_cursor(row=5)
        assert rows.cursor_key() == "vm05"
        built = table.rows["vm05"]

        # Sorted by a live figure: the same rows, reversed, one figure changed.
        order = list(reversed(range(ROWS)))
        assert rows.sync([(f"vm{i:02d}", values(i, "9.5" if i == 5 else "0")) for i in order]) is False
        await pilot.pause()
        assert table.rows["vm05"] is built                      # moved, not rebuilt
        assert rows.keys == [f"vm{i:02d}" for i in order]
        assert rows.cursor_key() == "vm05" and table.cursor_row == order.index(5)
        text = ["".join(seg.text for seg in table.render_line(y)) for y in range(table.size.height)]
        shown = [line.split()[0] for line in text[1:] if line.strip()]
        first = int(table.scroll_y)
        assert shown == rows.keys[first:first + len(shown)]     # drawn in the new order
        assert any(line.split()[0] == "vm05" and "9.5" in line for line in text)

        # A different set of rows is rebuilt.
        assert rows.sync([(f"vm{i:02d}", values(i)) for i in range(3)]) is True
        assert rows.keys == ["vm00", "vm01", "vm02"]
