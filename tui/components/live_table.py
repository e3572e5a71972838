"""Keep a DataTable in step with live data without clearing it on every update.

Rows are rebuilt only when the set of row keys (what is shown) changes; the same rows in a new order
(a sort by a live figure) are moved in place; otherwise only the cells whose text changed are updated,
and only those cells are repainted. For a big list
(1,000 VMs) only the rows in view are updated each tick (``sync_keys``, ``update_visible``); rows
that scroll into view catch up at once (``LiveDataTable.on_scrolled``).
"""
from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.cache import LRUCache
from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey
from textual._two_way_dict import TwoWayDict


FIRST_ROWS = 100      # rows a rebuild adds at once (more than any screen shows) ...
ADD_CHUNK = 300       # ... the rest this many per refresh after that


class LiveDataTable(DataTable):
    """A DataTable whose ``set_cell`` repaints one cell.

    ``DataTable.update_cell`` repaints the whole table, and Textual sends every repainted region to
    the terminal: a 4 Hz faults/s column would resend the whole table four times a second.
    """

    def _update_dimensions(self, new_rows) -> None:
        """DataTable measures every cell of every new row (for automatic column widths): 8,000
        measurements for 1,000 VMs, most of the list's first-screen time. LiveRows gives every
        column a fixed width and rows are one line, so only rows that need a height are measured."""
        if not any(column.auto_width for column in self.columns.values()):
            new_rows = [key for key in new_rows if key in self.rows and self.rows[key].auto_height]
        super()._update_dimensions(new_rows)

    on_scrolled = None      # called (no arguments) after the rows in view changed by scrolling

    def __init__(self, *args, **kwargs) -> None:
        self._cells_by_text: LRUCache[tuple, list] = LRUCache(4096)    # before: DataTable's init clears caches
        super().__init__(*args, **kwargs)

    def _render_cell(self, row_index: int, column_index: int, base_style: Style, width: int,
                     cursor: bool = False, hover: bool = False):
        """DataTable's rendered cell, cached by the cell's text rather than by ``_update_count``:
        DataTable bumps that count for every changed cell, so one new faults/s figure re-renders
        every cell of its line (rich's render, the costliest part of a tick). A cell a sort moved to
        another row (with the same look: zebra parity, cursor) gets its new coordinate only. Header
        and label cells, and cells that are not plain text, are left to DataTable."""
        if row_index < 0 or column_index < 0:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_key = self._row_locations.get_key(row_index)
        column_key = self._column_locations.get_key(column_index)
        text = self._data[row_key].get(column_key)
        if not isinstance(text, str):
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        anywhere = (column_index, row_key, column_key, text, base_style, width, cursor, hover,
                    self.rows[row_key].height, self._show_hover_cursor, self._pseudo_class_state, self.show_cursor,
                    self.fixed_rows, self.fixed_columns, self.cell_padding, self.cursor_foreground_priority,
                    self.cursor_background_priority)
        key = (row_index, anywhere)
        lines = self._cells_by_text.get(key)
        if lines is None:
            moved = self._cells_by_text.get(anywhere)
            if moved is not None:           # the same cell drawn at another row (a sort moved it)
                lines = _at_row(moved, row_index, column_index)
            else:
                lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
                self._cells_by_text[anywhere] = lines
            self._cells_by_text[key] = lines
        return lines

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._cells_by_text.clear()

    def notify_style_update(self) -> None:
        super().notify_style_update()       # a theme or CSS change: cells render differently
        self._cells_by_text.clear()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self.on_scrolled is not None and int(old_value) != int(new_value):
            self.on_scrolled()

    def set_cell(self, row_key: str, column_key: str, text: str) -> None:
        rk, ck = RowKey(row_key), ColumnKey(column_key)
        column = self.columns[ck]
        if len(text) > column.width:                   # wider than its column: widen it (relayout)
            column.width = len(text)
            self.update_cell(rk, ck, text, update_width=True)
            return
        # DataTable.update_cell's bookkeeping (Textual 8.2.8, pinned) without its full refresh.
        self._data[rk][ck] = text
        self._bump_update_count()
        self.refresh_coordinate(Coordinate(self._row_locations.get(rk), self._column_locations.get(ck)))

    def set_order(self, keys: list[str]) -> None:
        """Show the rows (the same ones) in the order of ``keys``: DataTable.sort's bookkeeping (Textual
        8.2.8, pinned) with the order given, instead of a clear and 1,000 add_row calls."""
        self._row_locations = TwoWayDict({RowKey(key): index for index, key in enumerate(keys)})
        self._update_count += 1
        self.refresh()

    def _bump_update_count(self) -> None:
        """DataTable keys every cache on ``_update_count``, the row order and the line offsets too,
        which it rebuilds over every row (1,000 VMs: 3 ms, once per changed cell, since finding a
        cell's region needs them). A cell's new text of the same width moves no row: carry those two over."""
        old = self._update_count
        self._update_count = new = old + 1
        rows = self._ordered_row_cache.get((len(self.rows), old))
        if rows is not None:
            self._ordered_row_cache[(len(self.rows), new)] = rows
        offsets = self._offset_cache.get(old)
        if offsets is not None:
            self._offset_cache[new] = offsets


def _at_row(lines: list[list[Segment]], row_index: int, column_index: int) -> list[list[Segment]]:
    """A rendered cell as DataTable would render it at ``row_index``: its segments carry the cell's
    coordinate as style meta (what a mouse click reports), nothing else depends on the row."""
    meta = Style.from_meta({"row": row_index, "column": column_index})
    return [[Segment(text, style.clear_meta_and_links() + meta if style is not None else meta, control)
             for text, style, control in line] for line in lines]


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
        self._rebuilding = False
        self._keyset: set[str] = set()
        self._generation = 0            # bumped per rebuild: rows still to add belong to one
        self._cells: dict[tuple[str, str], str] = {}
        self.cell_updates = 0           # cells really changed (for tests and benchmarks)

    def sync(self, rows: list[tuple[str, dict[str, str]]]) -> bool:
        """Show ``rows`` ([(key, {column: text})]) in order; return True if the rows were rebuilt."""
        keys = [key for key, _ in rows]
        if (keys != self.keys or not self._built) and not self._reorder(keys):
            cursor = self.cursor_key()
            self._rebuilding = True          # clear() scrolls to the top: no row updates meanwhile
            self.table.clear(columns=True)
            for c in self.columns:
                width = max([len(self.labels[c]), self.min_widths.get(c, 0)] + [len(v[c]) for _, v in rows])
                self.table.add_column(self.labels[c], key=c, width=width)
            self._cells.clear()
            for key, values in rows:
                self._cells.update({(key, c): values[c] for c in self.columns})
            self.keys = keys
            self._keyset = set(keys)
            self._built = True
            self._rebuilding = False
            self._generation += 1
            # A screenful (and more) now; a big list's other rows after the first paint, in chunks,
            # so 1,000 VMs show as fast as 100 do.
            self._add_rows(keys[:FIRST_ROWS])
            self._add_later(keys[FIRST_ROWS:], self._generation, cursor)
            if cursor in keys and keys.index(cursor) < FIRST_ROWS:
                self.table.move_cursor(row=keys.index(cursor))
            return True
        for key, values in rows:
            self.update(key, values)
        return False

    def _add_rows(self, keys: list[str]) -> None:
        for key in keys:
            self.table.add_row(*(self._cells[(key, c)] for c in self.columns), key=key)

    def _add_later(self, keys: list[str], generation: int, cursor: str | None) -> None:
        """Add ``keys`` after the next refresh, ADD_CHUNK at a time (unless rebuilt meanwhile)."""
        if not keys:
            return

        def add() -> None:
            if generation != self._generation:
                return                       # rebuilt since: those rows are not wanted any more
            self._add_rows([key for key in keys[:ADD_CHUNK] if key not in self.table.rows])  # (a reorder adds all)
            if cursor is not None and cursor in keys[:ADD_CHUNK]:
                self.table.move_cursor(row=self.keys.index(cursor))
            self._add_later(keys[ADD_CHUNK:], generation, cursor)
        self.table.call_after_refresh(add)

    def sync_keys(self, keys: list[str], values_of) -> bool:
        """``sync`` for a big list: ``values_of(key)`` is asked only for the rows it needs. Rows are
        rebuilt (all values) when the keys changed; otherwise only the rows in view are updated
        (``update_visible``: the rest catch up when they scroll into view). True if rebuilt."""
        if (keys != self.keys or not self._built) and not self._reorder(keys):
            return self.sync([(key, values_of(key)) for key in keys])
        self.update_visible(values_of)
        return False

    def _reorder(self, keys: list[str]) -> bool:
        """The rows shown, in a new order (a sort by a live figure, every tick): moved in place (rows a
        rebuild was still adding are added now), the cursor staying on its row's key. False when the
        rows are not the same ones: rebuild instead."""
        if not self._built or len(keys) != len(self.keys) or not self._keyset.issuperset(keys):
            return False
        if len(self.table.rows) != len(keys):       # a rebuild is still adding rows a chunk at a time
            self._add_rows([key for key in self.keys if key not in self.table.rows])
        cursor = self.cursor_key()
        self.keys = keys
        self.table.set_order(keys)
        if cursor is not None:
            self.table.move_cursor(row=keys.index(cursor))
        return True

    def visible_keys(self) -> list[str]:
        """The keys of the rows in view (all of them before the table has a size)."""
        height = self.table.scrollable_content_region.height
        if height <= 0:
            return list(self.keys)
        first = int(self.table.scroll_y)
        return self.keys[first:first + height]

    def update_visible(self, values_of, only: set[str] | None = None) -> None:
        """Update the rows in view (those in ``only``, if given) from ``values_of(key)``."""
        if self._rebuilding:
            return
        for key in self.visible_keys():
            if only is None or key in only:
                values = values_of(key)
                if values is not None:
                    self.update(key, values)

    def update(self, key: str, values: dict[str, str]) -> None:
        """Update one row's changed cells (a row not shown is ignored; one not added yet gets them
        when it is)."""
        if key not in self._keyset:
            return
        added = key in self.table.rows
        for column, text in values.items():
            if self._cells.get((key, column)) != text:
                self._cells[(key, column)] = text
                self.cell_updates += 1
                if added:
                    self.table.set_cell(key, column, text)

    def cursor_key(self) -> str | None:
        row = self.table.cursor_row
        if not self.keys or row is None or not 0 <= row < len(self.keys):
            return None
        return self.keys[row]

    def invalidate(self) -> None:
        """Force the next sync to rebuild (e.g. a new sort order)."""
        self._built = False
