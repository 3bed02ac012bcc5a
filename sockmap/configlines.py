"""Where a rules file says what: line numbers of tables and keys, and errors that name them.

tomllib gives no positions, so ``Lines`` finds them in the text (the N-th ``[[rule]]``
header, a key's line within its table); ``Ctx.error`` makes the SockmapError
"FILE:LINE: [[table]] #N key 'k': what" with its fix. Pure.
"""

from __future__ import annotations

import re

from sockmap.errors import SockmapError

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*(?:\.|=)")


class Lines:
    """Line numbers of tables and keys, found in the text (best effort: a key written in a
    way this does not recognise gets its table's line)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (line number, header name, array?) for each table header, in order
        self.headers: list[tuple[int, str, bool]] = []
        # (header name, array?) -> positions in self.headers, in order: one lookup per table
        self.by_name: dict[tuple[str, bool], list[int]] = {}
        for i, line in enumerate(self.lines, 1):
            m = _HEADER.match(line) if line.lstrip().startswith("[") else None
            if m:
                name, arr = m.group(2).strip(), m.group(1) == "[["
                self.by_name.setdefault((name, arr), []).append(len(self.headers))
                self.headers.append((i, name, arr))

    def table(self, name: str, index: int | None = None) -> tuple[int, int]:
        """(first line, last line) of table ``name`` (the index-th ``[[name]]``); the top
        level (lines before the first header) for name ""."""
        if not name:
            end = self.headers[0][0] - 1 if self.headers else len(self.lines)
            return 1, end
        found = self.by_name.get((name, index is not None), [])
        if not found or (index is not None and index >= len(found)):
            return 1, len(self.lines)
        n = found[index or 0]
        line = self.headers[n][0]
        end = self.headers[n + 1][0] - 1 if n + 1 < len(self.headers) else len(self.lines)
        return line, end

    def key(self, name: str, index: int | None, key: str) -> int:
        start, end = self.table(name, index)
        for i in range(start, end + 1):
            m = _KEY.match(self.lines[i - 1])
            if m and m.group(1).strip("\"'") == key:
                return i
        if not name:  # a top-level key written as a table: its header's line
            for line, h, _arr in self.headers:
                if h == key or h.startswith(key + "."):
                    return line
        return start


class Ctx:
    def __init__(self, path: str, lines: Lines) -> None:
        self.path, self.lines = path, lines

    def error(self, table: str, index: int | None, key: str | None, what: str,
              fix: str) -> SockmapError:
        line = (self.lines.key(table, index, key) if key
                else self.lines.table(table, index)[0])
        where = f"[[{table}]] #{index + 1}" if index is not None else (f"[{table}]" if table
                                                                   else "top level")
        keytxt = f" key {key!r}" if key else ""
        return SockmapError(f"{self.path}:{line}: {where}{keytxt}: {what}", hint=fix)


def near(k: str, known: tuple[str, ...]) -> str:
    """The known key closest to ``k`` (quoted), or all of them: for "did you mean"."""
    import difflib  # only on an error: not at every start

    close = difflib.get_close_matches(k, known, n=1)
    return repr(close[0]) if close else " or ".join(repr(x) for x in known)
