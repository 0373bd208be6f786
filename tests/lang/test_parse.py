"""Parse stage: grammar, syntax tree shapes, spans and syntax diagnostics."""

from __future__ import annotations

import pytest
from lark import Lark

from cstar_dsl.lang import syntax as ast
from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.parse import MAX_DEPTH, _Layout, grammar_text, parse


def _value(text: str) -> ast.Value:
    block = parse(f"b {{\n  v = {text}\n}}\n").items[0]
    return block.items[0].value


def _error(text: str | bytes):
    with pytest.raises(CStarError) as caught:
        parse(text, "x.cstar")
    (diagnostic,) = caught.value.diagnostics
    return diagnostic


def test_grammar_is_lalr_without_conflicts():
    """strict mode (lark[interegular]) fails on any shift/reduce conflict or terminal collision."""
    Lark(grammar_text(), parser="lalr", lexer="basic", strict=True, postlex=_Layout())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128", ast.Number(128, "128")),
        ("1e-3", ast.Number(1e-3, "1e-3")),
        ("-2", ast.Number(-2, "-2")),
        ("16x", ast.Quantity(16, "x", "16x")),
        ("45%", ast.Quantity(45, "%", "45%")),
        ("1.2M", ast.Quantity(1.2, "M", "1.2M")),
        ('"a \\"b\\" \\\\c"', ast.String('a "b" \\c', "")),
        ("linf", ast.Name("linf")),
        ("svd-finetune", ast.Name("svd-finetune")),
    ],
)
def test_scalar_values(text, expected):
    assert _value(text) == expected


def test_compound_values():
    assert _value("8/255") == ast.Fraction(ast.Number(8, "8"), ast.Number(255, "255"))
    assert _value("16x params") == ast.Measure(ast.Quantity(16, "x", "16x"), ast.Name("params"))
    assert _value("params <= 700k") == ast.Bound(ast.Name("params"), "<=", ast.Quantity(700, "k", "700k"))
    call = _value("pgd(20, restarts = 2)")
    restarts = ast.Keyword(ast.Name("restarts"), ast.Number(2, "2"))
    assert call == ast.Call(ast.Name("pgd"), (ast.Number(20, "20"), restarts))
    assert _value("[\n  1,\n  [2, 3],\n]") == ast.List(
        (ast.Number(1, "1"), ast.List((ast.Number(2, "2"), ast.Number(3, "3"))))
    )


def test_quantity_scaling():
    assert ast.Quantity(700, "k", "700k").scaled == 700_000
    assert ast.Quantity(45, "%", "45%").scaled == pytest.approx(0.45)
    assert ast.Quantity(0.5, "G", "0.5G").scaled == 5e8


def test_items_blocks_labels_and_comments():
    document = parse(
        '# head\nextend "base.cstar"\n\ncompress {  # why\n  layer type Conv2d {\n    rank = 4\n  }\n'
        '  layer "fc" {}\n}\nevaluate {\n  require robust >= 60%\n}\n'
    )
    extend, compress, evaluate = document.items
    assert extend == ast.Extend(ast.String("base.cstar", ""))
    by_type, by_name = compress.items
    assert by_type.labels == (ast.Name("type"), ast.Name("Conv2d"))
    assert by_name.labels == (ast.String("fc", ""),) and by_name.items == ()
    assert evaluate.items[0].bound.subject.value == "robust"
    assert [c.text for c in document.comments] == ["# head", "# why"]


def test_spans_are_one_based_and_exact():
    document = parse("model {\n  classes = 10\n}\n", "m.cstar")
    attribute = document.items[0].items[0]
    assert (attribute.key.span.line, attribute.key.span.column) == (2, 3)
    assert (attribute.value.span.column, attribute.value.span.end_column) == (13, 15)
    assert attribute.span.path == "m.cstar"


def test_blank_lines_comments_and_crlf_are_layout_only():
    plain = parse("a {\n  b = 1\n}\n")
    noisy = parse("\r\n\r\n# c\r\na {  # x\r\n\r\n  # y\r\n  b = 1  # z\r\n\r\n}\r\n# end")
    assert plain == noisy


@pytest.mark.parametrize(
    ("text", "code", "line", "column"),
    [
        ("model {\n  eps 0.3\n}\n", "missing-equals", 2, 7),
        ('model {\n  arch = "resnet\n}\n', "unterminated-string", 2, 10),
        ("model {\n  eps = 0.3.1\n}\n", "invalid-number", 2, 9),
        ("model {\n  eps = 16xy\n}\n", "invalid-number", 2, 9),
        ("model {\n  eps = @\n}\n", "unexpected-character", 2, 9),
        ("model {\n  classes = 10\n", "unexpected-end", 3, 1),
        ("model {\n  eps = }\n", "unexpected-token", 2, 9),
        ("model {\n  a = 1  b = 2\n}\n", "missing-line-break", 2, 10),
        ("", None, None, None),
    ],
)
def test_syntax_errors_point_at_the_problem(text, code, line, column):
    if code is None:
        assert parse(text).items == ()
        return
    diagnostic = _error(text)
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == (code, line, column)


def test_unclosed_block_names_the_opening_brace():
    diagnostic = _error("model {\n  x = [1,\n")
    assert diagnostic.code == "unexpected-end"
    assert "line 2" in diagnostic.help


def test_non_utf8_bytes_are_a_diagnostic():
    diagnostic = _error(b"model {\n  arch = \"\xff\"\n}\n")
    assert diagnostic.code == "invalid-encoding"
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 11)


def test_deep_nesting_is_refused_before_any_recursion():
    diagnostic = _error("a {\n  v = " + "[" * 100_000 + "\n}\n")
    assert diagnostic.code == "too-deeply-nested"
    assert diagnostic.span.column == 7 + MAX_DEPTH - 1


def test_megabyte_lines_parse():
    long_string = '"' + "x" * 1_000_000 + '"'
    document = parse(f"a {{\n  v = {long_string}  # {'y' * 1_000_000}\n}}\n")
    assert len(document.items[0].items[0].value.value) == 1_000_000
    assert len(document.comments[0].text) == 1_000_002


def test_long_lists_parse():
    value = "[" + ", ".join(["1"] * 20_000) + "]"
    document = parse(f"a {{\n  v = {value}\n}}\n")
    assert len(document.items[0].items[0].value.items) == 20_000
