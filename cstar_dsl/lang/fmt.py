"""Formatting: a syntax tree and its comments -> the canonical text of a recipe (``cstar fmt``).

Two-space indents, one item per line, one blank line between top-level blocks, blank lines
inside blocks kept (at most one), every comment kept where it was: above the item it preceded,
or at the end of the line it ended.
"""

from __future__ import annotations

from . import syntax as ast
from .parse import parse
from .source import SourceFile

INDENT = "  "
MAX_WIDTH = 100


def format_text(text: str | bytes, path: str = "<spec>") -> str:
    """The canonical form of recipe text (raises CStarError on a syntax error)."""
    return format_document(parse(text, path))


def format_document(document: ast.Document) -> str:
    """The canonical text of a parsed recipe."""
    writer = _Writer(document.source or SourceFile("<spec>", ""), document.comments)
    for index, item in enumerate(document.items):
        writer.want_blank = index > 0
        writer.item(item, 0)
    writer.flush_comments(None, 0)
    text = "\n".join(writer.lines).strip("\n")
    return text + "\n" if text else ""


class _Writer:
    """Emits output lines, weaving the comments back in by their source lines."""

    def __init__(self, source: SourceFile, comments: tuple[ast.Comment, ...]) -> None:
        self.source = source
        self.pending = sorted(comments, key=lambda c: c.span.start)
        self.lines: list[str] = []
        self.last_line = 0  # the source line the output has reached
        self.want_blank = False

    # -------------------------------------------------------------- items

    def item(self, item: ast.Item, depth: int) -> None:
        if isinstance(item, ast.Block):
            self.block(item, depth)
        elif isinstance(item, ast.Attribute):
            self.attribute(item, depth)
        elif isinstance(item, ast.Requirement):
            self.emit(f"require {ast.render_value(item.bound)}", item.span.line, item.span.end_line, depth)
        else:
            self.emit(f"extend {item.path.text}", item.span.line, item.span.end_line, depth)
            self.want_blank = True

    def block(self, block: ast.Block, depth: int) -> None:
        header = " ".join([block.kind.value, *(_label(label) for label in block.labels)])
        if not block.items and not self._comments_inside(block.span.end, block.close.start):
            self.emit(f"{header} {{}}", block.span.line, block.close.end_line, depth)
            return
        self.emit(f"{header} {{", block.span.line, block.span.end_line, depth)
        for item in block.items:
            self.item(item, depth + 1)
        self.flush_comments(block.close.line, depth + 1)
        self.emit("}", block.close.line, block.close.line, depth, allow_blank=False)

    def attribute(self, attribute: ast.Attribute, depth: int) -> None:
        key, value = attribute.key.value, attribute.value
        one_line = f"{key} = {ast.render_value(value)}"
        fits = len(INDENT * depth + one_line) <= MAX_WIDTH
        if not isinstance(value, ast.List) or not value.items or (
            fits and not self._comments_inside(value.span.start, value.span.end)
        ):
            self.emit(one_line, attribute.span.line, attribute.span.end_line, depth)
            return
        self.emit(f"{key} = [", attribute.span.line, value.span.line, depth)
        for element in value.items:
            self.emit(f"{ast.render_value(element)},", element.span.line, element.span.end_line, depth + 1)
        self.flush_comments(value.span.end_line, depth + 1)
        self.emit("]", value.span.end_line, value.span.end_line, depth, allow_blank=False)

    # ----------------------------------------------------------- emission

    def emit(self, text: str, first_line: int, last_line: int, depth: int, *, allow_blank: bool = True) -> None:
        """One output line for source lines ``first_line..last_line``, with the comments due."""
        self.flush_comments(first_line, depth)
        self._blank_line_if_due(first_line, allow_blank)
        self.lines.append(INDENT * depth + text + self._trailing_comment(last_line))
        self.last_line = max(self.last_line, last_line)

    def flush_comments(self, before_line: int | None, depth: int) -> None:
        """Own-line comments above ``before_line`` (all of them when None)."""
        while self.pending and (before_line is None or self.pending[0].span.line < before_line):
            comment = self.pending.pop(0)
            self._blank_line_if_due(comment.span.line, True)
            self.lines.append(INDENT * depth + comment.text.rstrip())
            self.last_line = max(self.last_line, comment.span.line)

    def _trailing_comment(self, line: int) -> str:
        if self.pending and self.pending[0].span.line == line and self._follows_code(self.pending[0]):
            return "  " + self.pending.pop(0).text.rstrip()
        return ""

    def _blank_line_if_due(self, line: int, allowed: bool) -> None:
        opened = not self.lines or self.lines[-1].endswith(("{", "[")) or not self.lines[-1]
        blank_in_source = any(
            not self.source.line_text(n).strip() for n in range(self.last_line + 1, line)
        )
        if allowed and not opened and (self.want_blank or blank_in_source):
            self.lines.append("")
        self.want_blank = False

    def _follows_code(self, comment: ast.Comment) -> bool:
        line = self.source.line_text(comment.span.line)
        return bool(line[: comment.span.column - 1].strip())

    def _comments_inside(self, start: int, end: int) -> bool:
        return any(start < c.span.start < end for c in self.pending)


def _label(label: ast.String | ast.Name) -> str:
    return label.text if isinstance(label, ast.String) else label.value
