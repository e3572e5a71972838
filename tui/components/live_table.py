"""Keep a DataTable in step with live data without clearing it on every update.

Rows are rebuilt only when the list of row keys (what is shown, in which order) changes; otherwise
only the cells whose text changed are updated (``DataTable.update_cell``).
"""
from __future__ import annotations

from textual.widgets import DataTable


class LiveRows:
    def __init__(self, table: DataTable, columns: list[str]) -> None:
        self.table = table
        self.columns = columns
        self.keys: list[str] = []
        self._cells: dict[tuple[str, str], str] = {}
        self.cell_updates = 0           # cells really changed (for tests and benchmarks)

    def sync(self, rows: list[tuple[str, dict[str, str]]]) -> bool:
        """Show ``rows`` ([(key, {column: text})]) in order; return True if the rows were rebuilt."""
        keys = [key for key, _ in rows]
        if keys != self.keys:
            cursor = self.cursor_key()
            self.table.clear()
            self._cells.clear()
            for key, values in rows:
                self.table.add_row(*(values[c] for c in self.columns), key=key)
                self._cells.update({(key, c): values[c] for c in self.columns})
            self.keys = keys
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
                self.table.update_cell(key, column, text)

    def cursor_key(self) -> str | None:
        row = self.table.cursor_row
        if not self.keys or row is None or not 0 <= row < len(self.keys):
            return None
        return self.keys[row]

    def invalidate(self) -> None:
        """Force the next sync to rebuild (e.g. a new sort order)."""
        self.keys = []
