"""Parse stage: recipe text -> syntax tree (cstar_dsl.syntax), or syntax diagnostics."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from lark import Lark, Token
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from . import syntax as ast
from .errors import CStarError, Diagnostic
from .source import SourceFile, Span
from .tree import ToSyntax, token_span

MAX_DEPTH = 32
_OPENERS = {"LPAR": "RPAR", "LSQB": "RSQB", "LBRACE": "RBRACE"}
_CLOSERS = {close: open_ for open_, close in _OPENERS.items()}
_TERMINAL_TEXT = {
    "NAME": "a name",
    "STRING": "a string",
    "NUMBER": "a number",
    "QUANTITY": "a number with a unit",
    "COMPARE": "a comparison such as `>=`",
    "EQUALS": "`=`",
    "SLASH": "`/`",
    "COMMA": "`,`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "_NL": "a line break",
    "$END": "the end of the file",
    "EXTEND": "`extend`",
    "REQUIRE": "`require`",
}


def grammar_text() -> str:
    """The grammar: the copy packaged in the wheel, else the repository's ``grammar/cstar.lark``."""
    packaged = resources.files("cstar_dsl").joinpath("grammar").joinpath("cstar.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "grammar" / "cstar.lark").read_text("utf-8")


class _NestingTooDeep(LarkError):
    def __init__(self, token: Token) -> None:
        super().__init__(f"nesting deeper than {MAX_DEPTH}")
        self.token = token


class _Layout:
    """Post-lexer: folds runs of line breaks into one, drops them inside ( ) and [ ], bounds nesting.

    Bounding the depth keeps every later (recursive) stage safe on hostile input.
    """

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        brackets = 0
        depth = 0
        previous_type = None
        for token in stream:
            if token.type == "_NL":
                if brackets or previous_type == "_NL":
                    continue
            elif token.type in _OPENERS:
                depth += 1
                brackets += token.type != "LBRACE"
                if depth > MAX_DEPTH:
                    raise _NestingTooDeep(token)
            elif token.type in _CLOSERS:
                depth = max(0, depth - 1)
                if token.type != "RBRACE":
                    brackets = max(0, brackets - 1)
            if token.type != "COMMENT":
                previous_type = token.type
            yield token


@functools.cache
def _parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="basic",
        propagate_positions=True,
        maybe_placeholders=False,
        postlex=_Layout(),
    )


def parse(text: str | bytes, path: str = "<spec>") -> ast.Document:
    """Parse recipe text into a syntax tree.

    Raises:
        CStarError: with one diagnostic, for the first syntax error.

    >>> parse('threat {\\n  eps = 8/255\\n}\\n').items[0].kind.value
    'threat'
    """
    source = _decode(text, path)
    try:
        tree = _parser().parse(source.text)
        comments = _comments(source.text)
    except _NestingTooDeep as error:
        raise CStarError([_too_deep(source, error.token)]) from None
    except UnexpectedInput as error:
        raise CStarError([_syntax_diagnostic(source, error)]) from None
    items = ToSyntax(source).transform(tree)
    return ast.Document(items, tuple(ast.Comment(t.value, token_span(source, t)) for t in comments), source)


def _decode(text: str | bytes, path: str) -> SourceFile:
    if isinstance(text, str):
        return SourceFile(path, text.removeprefix("\ufeff"))
    try:
        return SourceFile(path, text.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as error:
        source = SourceFile(path, text.decode("utf-8", errors="replace"))
        bad = text[:error.start].decode("utf-8", errors="replace")
        diagnostic = Diagnostic(
            "invalid-encoding",
            f"the file is not valid UTF-8 (byte 0x{text[error.start]:02x} at offset {error.start})",
            source.span(len(bad), len(bad) + 1),
            label="not UTF-8",
            help="save the recipe as UTF-8 text",
        )
        raise CStarError([diagnostic]) from None


# After a successful parse, strings are well formed, so this scan finds exactly the lexer's
# comments, at a fraction of the cost of lexing the text a second time.
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\r\n]*')


def _comments(text: str) -> list[Token]:
    return [Token("COMMENT", m.group(), start_pos=m.start()) for m in _STRING_OR_COMMENT.finditer(text)
            if m.group().startswith("#")]


# ---------------------------------------------------------------- syntax errors


def _too_deep(source: SourceFile, token: Token) -> Diagnostic:
    return Diagnostic(
        "too-deeply-nested",
        f"brackets and blocks are nested more than {MAX_DEPTH} deep",
        token_span(source, token),
        label="too deep",
        help="a recipe never needs this much nesting; check for a runaway bracket",
    )


def _syntax_diagnostic(source: SourceFile, error: UnexpectedInput) -> Diagnostic:
    if isinstance(error, UnexpectedCharacters):
        # Lark types the position as optional, but its lexer always sets it for this error.
        return _bad_character(source, error.pos_in_stream or 0)
    if isinstance(error, UnexpectedToken):
        return _bad_token(source, error)
    offset = len(source.text)
    return Diagnostic("unexpected-end", "the file ends too early", source.span(offset, offset))


_WORD = re.compile(r"[^\s,()\[\]{}=#]+")


def _bad_character(source: SourceFile, offset: int) -> Diagnostic:
    char = source.text[offset]
    if char == '"':
        control = re.compile(r'[\x00-\x08\x0a-\x1f\x7f]|(?<!\\)"').search(source.text, offset + 1)
        if control and control.group() not in '"\n\r':
            return Diagnostic(
                "unexpected-character",
                f"unexpected character {_describe_char(control.group())} in a string",
                source.span(control.start(), control.start() + 1),
                label="control character",
                help="strings cannot hold control characters",
            )
        end = source.text.find("\n", offset)
        end = len(source.text) if end < 0 else end
        span = source.span(offset, end - (source.text[end - 1 : end] == "\r"))
        return Diagnostic(
            "unterminated-string",
            "this string has no closing quote",
            span,
            label="string starts here",
            help='close it with `"` on the same line; strings cannot span lines',
        )
    start = offset
    while start > 0 and _WORD.fullmatch(source.text[start - 1]):
        start -= 1
    word = _WORD.match(source.text, start)
    text = word.group() if word else char
    in_word = char.isalnum() or char in "._%"
    if in_word and (text[0].isdigit() or (text[0] in ".-" and any(c.isdigit() for c in text))):
        return Diagnostic(
            "invalid-number",
            f"`{_clip(text)}` is not a number",
            source.span(start, start + len(text)),
            label="not a number",
            help="write numbers like 128, 0.3, 1e-3 or 8/255, with at most one unit: x, %, k, M or G",
        )
    after_number = offset > 1 and source.text[offset - 1] == " " and source.text[offset - 2].isdigit()
    return Diagnostic(
        "unexpected-character",
        f"unexpected character {_describe_char(char)}",
        source.span(offset, offset + 1),
        label="not allowed here",
        help="write a unit right after its number, as in `45%`" if char == "%" and after_number else
        "names, numbers, strings in double quotes, `=`, brackets and `#` comments make up a recipe",
    )


def _bad_token(source: SourceFile, error: UnexpectedToken) -> Diagnostic:
    token = error.token
    expected = sorted({_TERMINAL_TEXT.get(name, name) for name in error.expected if not name.startswith("__")})
    if token.type == "$END":
        offset = len(source.text)
        opener = _unclosed_opener(source)
        return Diagnostic(
            "unexpected-end",
            "the file ends before the recipe is complete",
            source.span(offset, offset),
            label=f"expected {_one_of(expected)}",
            help=f"close the `{opener.value}` opened on line {opener.line}" if opener else None,
        )
    span = token_span(source, token)
    shown = "line break" if token.type == "_NL" else f"`{_clip(str(token.value))}`"
    if token.type == "_NL" and "LBRACE" in error.expected and "EQUALS" not in error.expected:
        return Diagnostic(
            "missing-equals",
            "this line is neither a setting nor a block",
            span,
            label="expected `=` or `{`",
            help="write a setting as `key = value`, and a block as `name { ... }`",
        )
    if "EQUALS" in error.expected and len(error.expected) <= 4 and token.type != "_NL":
        return Diagnostic(
            "missing-equals",
            f"expected `=` after the key, found {shown}",
            span,
            label="expected `=` before this",
            help="write a setting as `key = value`, one per line",
        )
    if "_NL" in error.expected and token.type not in ("_NL", "RBRACE"):
        if token.type == "EQUALS":  # `a = 1 b = 2`: `1 b` read as a measure; the new item starts at `b`
            span = _word_before(source, span.start)
            shown = f"`{source.text[span.start:span.end]}`"
        return Diagnostic(
            "missing-line-break",
            f"unexpected {shown} after a complete item",
            span,
            label="expected a line break before this",
            help="put each setting, block and `require` on a line of its own",
        )
    return Diagnostic(
        "unexpected-token",
        f"unexpected {shown}",
        span,
        label=f"expected {_one_of(expected)}",
    )


def _word_before(source: SourceFile, offset: int) -> Span:
    end = offset
    while end > 0 and source.text[end - 1] in " \t":
        end -= 1
    start = end
    while start > 0 and _WORD.fullmatch(source.text[start - 1]):
        start -= 1
    return source.span(start, end)


def _unclosed_opener(source: SourceFile) -> Token | None:
    stack: list[Token] = []
    for token in _parser().lex(source.text, dont_ignore=True):
        if token.type in _OPENERS:
            stack.append(token)
        elif token.type in _CLOSERS and stack:
            stack.pop()
    return stack[-1] if stack else None


def _one_of(options: list[str]) -> str:
    if len(options) <= 1:
        return options[0] if options else "something else"
    return ", ".join(options[:-1]) + " or " + options[-1]


def _describe_char(char: str) -> str:
    if char.isprintable() and not char.isspace():
        return f"`{char}`"
    return f"U+{ord(char):04X}"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
