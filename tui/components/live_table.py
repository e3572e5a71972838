"""Keep a DataTable in step with live data without clearing it on every update.

Rows are rebuilt only when the list of row keys (what is shown, in which order) changes; otherwise
only the cells whose text changed are updated, and only those cells are repainted.
"""
from __future__ import annotations

from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey


class LiveDataTable(DataTable):
    """A DataTable whose ``set_cell`` repaints one cell.

    ``DataTable.update_cell`` repaints the whole table, and Textual sends every repainted region to
    the terminal: a 4 Hz faults/s column would resend the whole table four times a second.
    """

    def set_cell(self, row_key: str, column_key: str, text: str) -> None:
        rk, ck = RowKey(row_key), ColumnKey(column_key)
        column = self.columns[ck]
        if len(text) > column.width:                   # wider than its column: widen it (relayout)
            column.width = len(text)
            self.update_cell(rk, ck, text, update_width=True)
            return
        # DataTable.update_cell's bookkeeping (Textual 8.2.8, pinned) without its full refresh.
        self._data[rk][ck] = text
        self._update_count += 1
        self.refresh_coordinate(Coordinate(self._row_locations.get(rk), self._column_locations.get(ck)))


class LiveRows:
    """The rows of a LiveDataTable. Columns get fixed widths, measured whenever the rows are rebuilt
    (at least ``min_widths``): DataTable's automatic widths are recomputed when the widget is idle,
    which a table on a screen beneath a dialog may never be, leaving cells cut short."""

    def __init__(self, table: LiveDataTable, columns: list[tuple[str, str]],
                 min_widths: dict[str, int] | None = None) -> None:
        self.table = table
        self.labels = dict(columns)
        self.columns = [key for key, _ in columns]
        self.min_widths = min_widths or {}
        self.keys: list[str] = []
        self._built = False             # columns exist once the first sync made them
        self._cells: dict[tuple[str, str], str] = {}
        self.cell_updates = 0           # cells really changed (for tests and benchmarks)

    def sync(self, rows: list[tuple[str, dict[str, str]]]) -> bool:
        """Show ``rows`` ([(key, {column: text})]) in order; return True if the rows were rebuilt."""
        keys = [key for key, _ in rows]
        if keys != self.keys or not self._built:
            cursor = self.cursor_key()
            self.table.clear(columns=True)
            for c in self.columns:
                width = max([len(self.labels[c]), self.min_widths.get(c, 0)] + [len(v[c]) for _, v in rows])
                self.table.add_column(self.labels[c], key=c, width=width)
            self._cells.clear()
            for key, values in rows:
                self.table.add_row(*(values[c] for c in self.columns), key=key)
                self._cells.update({(key, c): values[c] for c in self.columns})
            self.keys = keys
            self._built = True
            if cursor in keys:
                self.table.move_cursor(row=keys.index(cursor))
            return True
        for key, values in rows:
            self.update(key, values)
        return False

    def update(self, key: str, values: dict[str, str]) -> None:
        """Update one row's changed cells (a row not shown is ignored)."""
        if key not in self.keys:
            return
        for column, text in values.items():
            if self._cells.get((key, column)) != text:
                self._cells[(key, column)] = text
                self.cell_updates += 1
                self.table.set_cell(key, column, text)

    def cursor_key(self) -> str | None:
        row = self.table.cursor_row
        if not self.keys or row is None or not 0 <= row < len(self.keys):
            return None
        return self.keys[row]

    def invalidate(self) -> None:
        """Force the next sync to rebuild (e.g. a new sort order)."""
        self._built = False
