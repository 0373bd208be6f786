"""Property-based tests (hypothesis) of the recipe front end: parse, fmt and check.

* Robustness: no input, text or bytes, makes parse, format or check raise anything but a
  ``CStarError`` that carries well-formed diagnostics.
* Mutations: the example recipes in specs/, with tokens and lines deleted, duplicated, swapped or
  replaced, either still check or are reported with at least one error.
* Formatter: on the specs, on parseable mutants and on generated recipes, ``fmt`` is idempotent,
  keeps the syntax tree and keeps every comment.

Every test is derandomized, so a CI run is deterministic; the file runs in well under a minute.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.fmt import format_document, format_text
from cstar_dsl.lang.parse import MAX_DEPTH, parse
from cstar_dsl.lang.validate import Checked, check_file
from tests.helpers import SPECS

# read once: strategies must not see a spec change halfway through a run
SPEC_TEXTS = {p.name: p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.cstar"))}
SPEC_NAMES = sorted(SPEC_TEXTS)
CODE = re.compile(r"^[a-z]+(-[a-z]+)*$")
# CSTAR_HYPOTHESIS_SCALE=10 runs ten times the examples (a longer local bug hunt); CI uses 1
SCALE = float(os.environ.get("CSTAR_HYPOTHESIS_SCALE", "1"))


def _settings(examples: int, **overrides: object) -> settings:
    """Deterministic settings: a fixed example budget, no deadline, no example database."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        **overrides,
    )


# ------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of specs/ (so `extend "resnet18.cstar"` resolves) to write test files into."""
    folder = tmp_path_factory.mktemp("properties") / "specs"
    folder.mkdir()
    for name, text in SPEC_TEXTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def assert_well_formed(error: CStarError) -> None:
    """A CStarError carries diagnostics with stable codes and 1-based positions."""
    assert error.diagnostics, "a CStarError without diagnostics"
    for diagnostic in error.diagnostics:
        assert CODE.match(diagnostic.code), f"malformed code {diagnostic.code!r}"
        assert diagnostic.message
        if diagnostic.span is not None:
            assert diagnostic.span.line >= 1 and diagnostic.span.column >= 1, diagnostic
            assert (diagnostic.span.end_line, diagnostic.span.end_column) >= (diagnostic.span.line,
                                                                                diagnostic.span.column)


def parse_or_report(text: str | bytes) -> None:
    """Parsing and formatting either succeed or raise a well-formed CStarError."""
    for stage in (parse, format_text):
        try:
            stage(text, "x.cstar")
        except CStarError as error:
            assert_well_formed(error)


def check_or_report(path: Path, data: str | bytes) -> Checked | None:
    """Write ``data`` to ``path`` and check it: a Checked, or a CStarError with at least one error."""
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    try:
        return check_file(path)
    except CStarError as error:
        assert_well_formed(error)
        assert any(d.is_error for d in error.diagnostics), "a CStarError with warnings only"
        return None


def assert_format_properties(text: str) -> None:
    """fmt is idempotent, keeps the syntax tree, and keeps every comment (in order)."""
    document = parse(text)
    formatted = format_document(document)  # format_text(text), without parsing twice
    reparsed = parse(formatted)
    assert format_document(reparsed) == formatted, "fmt is not idempotent"
    assert reparsed == document, "fmt changed the syntax tree"
    before = [c.text.rstrip() for c in document.comments]
    after = [c.text.rstrip() for c in reparsed.comments]
    for comment in before:
        assert comment in formatted, f"fmt lost the comment {comment!r}"
    assert Counter(after) == Counter(before), "fmt added or dropped comments"
    assert after == before, "fmt reordered comments"


# ---------------------------------------------------------------- 1. robustness

# characters a recipe is made of, plus the usual troublemakers
RECIPE_ALPHABET = list(' \t\f\n\r"#{}[]()=,/<>-+.%_\\xkMGeE0123456789abcdlnprtquz\x00\ufeff\u2028\x85é')

# what a recipe is made of, whole tokens, to reach past the lexer into the parser and checker
SOUP = st.sampled_from([
    "model", "data", "threat", "compress", "train", "evaluate", "export", "layer", "admm", "finetune",
    "pretrain", "type", "Conv2d", "Linear", "extend", "require", "eps", "step", "arch", "budget",
    "params", "macs", "robust", "clean", "policy", "energy", "pgd", "fgsm", "true", "false", "linf",
    "x", "1", "0", "-1", "8/255", "1e9", "16x", "45%", "700k", "1.5M", "0.5G", "1 epoch", "10", "0.1",
    '"fuzz.cstar"', '"missing.cstar"', '""', '"."', '"a\\"b"', '"cstar:digits-cnn"', '"layer4.*"',
    "{", "}", "[", "]", "(", ")", "=", ",", "/", ">=", "<=", "==", "<", ">", "#c", "\n", "\n\n", " ",
])


@_settings(300)
@given(st.text())
@example("a = " + "[" * (MAX_DEPTH + 1))
@example("\ufeff\ufeff")
@example("a {\n  b = 1\n}\n\x00")
def test_any_text_parses_or_reports(text):
    """parse and format_text raise nothing but well-formed CStarErrors, for any text."""
    parse_or_report(text)


@_settings(200)
@given(st.text(st.characters(codec=None, exclude_categories=())))
def test_any_text_with_surrogates_parses_or_reports(text):
    """parse and format_text cope with lone surrogates in a str."""
    parse_or_report(text)


@_settings(300)
@given(st.binary())
@example(b"\xef\xbb\xbfmodel {}\n")
@example(b'model {\n  arch = "\xff"\n}\n')
@example(b"\xff")
def test_any_bytes_parse_or_report(data):
    """parse and format_text raise nothing but well-formed CStarErrors, for any bytes."""
    parse_or_report(data)


@_settings(200)
@given(st.text(st.sampled_from(RECIPE_ALPHABET)))
def test_recipe_like_text_parses_or_reports(text):
    """Text over the recipe alphabet (brackets, quotes, digits, units) parses, formats or reports."""
    parse_or_report(text)


@_settings(150)
@given(text=st.text())
def test_check_file_of_any_text_reports(workdir, text):
    """check_file returns a Checked or raises a CStarError with an error, for any text."""
    check_or_report(workdir / "fuzz.cstar", text)


@_settings(150)
@given(data=st.binary())
def test_check_file_of_any_bytes_reports(workdir, data):
    """check_file returns a Checked or raises a CStarError with an error, for any bytes."""
    check_or_report(workdir / "fuzz.cstar", data)


@_settings(150)
@given(tokens=st.lists(SOUP, max_size=60), spaces=st.lists(st.sampled_from(["", " ", "\t", "\n"]), max_size=60))
def test_check_file_of_token_soup_reports(workdir, tokens, spaces):
    """Random sequences of recipe tokens parse, format and check, or are reported."""
    text = "".join(t + (spaces[i] if i < len(spaces) else " ") for i, t in enumerate(tokens))
    parse_or_report(text)
    check_or_report(workdir / "fuzz.cstar", text)


@_settings(60)
@given(depth=st.integers(1, 3 * MAX_DEPTH), opener=st.sampled_from(["[", "(", "{"]), closed=st.booleans())
def test_deep_nesting_parses_or_reports(workdir, depth, opener, closed):
    """Nested lists, calls and blocks at any depth parse or are refused with a diagnostic."""
    pairs = {"[": ("a = " + "[" * depth, "]" * depth), "(": ("a = " + "f(" * depth, ")" * depth),
             "{": ("b {\n" * depth, "}\n" * depth)}
    head, tail = pairs[opener]
    text = head + (tail if closed else "") + "\n"
    parse_or_report(text)
    check_or_report(workdir / "fuzz.cstar", text)


# ------------------------------------------------------------ 2. mutated specs

TOKEN = re.compile(
    r"""(?P<comment>\#[^\r\n]*)
      | (?P<string>"(?:[^"\\\r\n]|\\[^\r\n])*")
      | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?[x%kMG]?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*)
      | (?P<punct>>=|<=|==|[{}\[\]()=,/<>])
      | (?P<newline>\r?\n)
      | (?P<space>[ \t\f]+)
      | (?P<other>.)""",
    re.VERBOSE,
)
VALUE_KINDS = {"string", "number", "name"}
VOCABULARY = ["{", "}", "[", "=", '"', "%", "x", "require", "extend", "8/255", "-1", "0", "1e9", "true", "layer"]


def tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens whose texts join back to ``text``."""
    tokens = [(m.lastgroup or "other", m.group()) for m in TOKEN.finditer(text)]
    assert "".join(t for _, t in tokens) == text
    return tokens


@st.composite
def mutation(draw, text: str) -> str:
    """``text`` after one token or line mutation."""
    tokens = tokenize(text)
    significant = [i for i, (kind, _) in enumerate(tokens) if kind != "space"]
    values = [i for i, (kind, _) in enumerate(tokens) if kind in VALUE_KINDS]
    texts = [t for _, t in tokens]
    operation = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert", "delete-line",
                                      "duplicate-line"]))
    if operation in ("delete-line", "duplicate-line"):
        lines = text.splitlines(keepends=True) or [""]
        index = draw(st.integers(0, len(lines) - 1))
        lines[index:index + 1] = [] if operation == "delete-line" else [lines[index], lines[index]]
        return "".join(lines)
    if not significant:
        return text
    index = draw(st.sampled_from(significant))
    if operation == "delete":
        del texts[index]
    elif operation == "duplicate":
        texts.insert(index + 1, " " + texts[index])
    elif operation == "swap":
        other = draw(st.sampled_from(significant))
        texts[index], texts[other] = texts[other], texts[index]
    elif operation == "replace" and values:
        texts[draw(st.sampled_from(values))] = texts[draw(st.sampled_from(values))]
    elif operation == "insert":
        pad = draw(st.sampled_from(["", " "]))
        texts.insert(index, pad + draw(st.sampled_from(VOCABULARY)) + pad)
    return "".join(texts)


@st.composite
def mutants(draw, most: int = 4) -> tuple[str, str]:
    """(spec name, the spec's text after one to ``most`` mutations)."""
    name = draw(st.sampled_from(SPEC_NAMES))
    text = SPEC_TEXTS[name]
    for _ in range(draw(st.integers(1, most))):
        text = draw(mutation(text))
    return name, text


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_specs_check_and_are_formatted(workdir, name):
    """Every example recipe checks clean and is already in canonical format (the mutations' base)."""
    assert isinstance(check_file(workdir / name), Checked)
    text = SPEC_TEXTS[name]
    assert format_text(text) == text


@_settings(300)
@given(mutant=mutants())
def test_mutated_specs_check_or_report(workdir, mutant):
    """A mutated spec is either still valid or rejected with at least one error diagnostic."""
    _, text = mutant
    result = check_or_report(workdir / "mutant.cstar", text)
    event("still valid" if result is not None else "rejected")


# Values at the edges of what the lexer accepts: numbers beyond the range of a float or of int(),
# infinities, paths with NUL or over-long names. check_file must report them, never crash.
BIG = "1" + "0" * 400  # an integer far beyond the range of a float
HOSTILE_PATHS = ['"a\x00b"', '"' + "a" * 300 + '"', '"' + "a/" * 2100 + '"', '""', '"/"', '"."']
HOSTILE_VALUES = [
    BIG, "-" + BIG, BIG + "k", BIG + "x", BIG + "%", BIG + "/3", "1/" + BIG, BIG + " epoch", "9" * 4301,
    "1e999", "-1e999", "1e-999", "-0", "0/0", "0x", "0%", *HOSTILE_PATHS,
]


@st.composite
def hostile_mutants(draw) -> str:
    """A spec with one value token replaced by an extreme value, or with an extreme `extend` first."""
    text = SPEC_TEXTS[draw(st.sampled_from(SPEC_NAMES))]
    if draw(st.integers(0, 4)) == 0:
        return f"extend {draw(st.sampled_from(HOSTILE_PATHS))}\n" + text
    tokens = tokenize(text)
    values = [i for i, (kind, _) in enumerate(tokens) if kind in ("number", "string")]
    texts = [t for _, t in tokens]
    texts[draw(st.sampled_from(values))] = draw(st.sampled_from(HOSTILE_VALUES))
    return "".join(texts)


@_settings(100)
@given(text=hostile_mutants())
def test_extreme_values_in_specs_check_or_report(workdir, text):
    """Specs holding extreme numbers and paths are checked or reported, never crash."""
    check_or_report(workdir / "hostile.cstar", text)


@pytest.mark.parametrize("text", [
    pytest.param("a = " + "1" * 4301 + "\n", id="4301-digits"),  # was VisitError: int() digit limit
    pytest.param(f"threat {{\n  eps = {BIG}\n}}\n", id="big-number"),  # was OverflowError: float(int)
    pytest.param(f"threat {{\n  eps = {BIG}/3\n}}\n", id="big-fraction"),  # was OverflowError: int / int
    pytest.param(f"data {{\n  batch_size = {BIG}k\n}}\n", id="big-thousands"),  # was OverflowError: Quantity.scaled
    pytest.param(f"data {{\n  split = {BIG}%\n}}\n", id="big-percent"),  # was OverflowError: Quantity.scaled
    pytest.param(f"model {{\n  classes = -{BIG}\n}}\n", id="big-negative"),  # was OverflowError: f"{int:g}"
    pytest.param(f"compress {{\n  budget = {BIG}x params\n}}\n", id="big-ratio"),  # was OverflowError: float(int)
    pytest.param(f"evaluate {{\n  require robust >= {BIG}\n}}\n", id="big-require"),  # was OverflowError (help)
    pytest.param('extend "\x00"\n', id="extend-nul"),  # was ValueError: embedded null byte, from Path.resolve
    pytest.param('extend "' + "a" * 256 + '"\n', id="extend-long-name"),  # was OSError: ENAMETOOLONG
])
def test_crash_reproducers(workdir, text):
    """Minimal reproducers of crashes the properties above found (now fixed) parse and check or report."""
    check_or_report(workdir / "reproducer.cstar", text)
    parse_or_report(text)


# ------------------------------------------------------------ 3. the formatter


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_format_properties_of_specs(name):
    """fmt is idempotent, keeps the tree and keeps every comment on each example recipe."""
    assert_format_properties(SPEC_TEXTS[name])


@_settings(60)
@given(mutant=mutants(most=2))
def test_format_properties_of_parseable_mutants(mutant):
    """On mutated specs that still parse, fmt is idempotent and keeps the tree and the comments."""
    _, text = mutant
    try:
        parse(text)
    except CStarError:
        assume(False)
    assert_format_properties(text)


# A small grammar of recipes with free layout: random blocks, values, comments, blank lines,
# indentation and line breaks inside brackets.

PUNCT = {"{", "}", "[", "]", "(", ")", "=", ",", "/", ">=", "<=", "==", "<", ">"}
KEYS = st.sampled_from(["model", "arch", "eps", "step", "budget", "layer", "policy", "keep", "a", "x_1",
                        "svd-finetune", "rho_schedule", "type", "Conv2d", "true", "linf", "params", "epoch"])
NAMES = KEYS | st.builds(
    lambda head, tail, parts: head + tail + "".join("-" + part for part in parts),
    st.sampled_from("abcxyzAZ_"),
    st.text("abz09_XY", max_size=5),
    st.lists(st.text("ab09_Z", min_size=1, max_size=3), max_size=2),
).filter(lambda name: name not in ("extend", "require"))
NUMBERS = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "-"]),
    st.integers(0, 10**6).map(str) | st.sampled_from(["0", "00", "007"]),
    st.sampled_from(["", "", ".5", ".25", ".0", ".001"]),
    st.sampled_from(["", "", "", "e3", "E-2", "e+10", "e999", "e-999"]),
)
QUANTITIES = st.builds(lambda number, unit: number + unit, NUMBERS, st.sampled_from(list("x%kMG")))
FRACTIONS = st.tuples(NUMBERS, st.just("/"), NUMBERS).map(list)
CONTROL = "".join(map(chr, [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]))  # not allowed in a string
STRINGS = st.lists(
    st.characters(exclude_characters=CONTROL + '"\\', codec="utf-8")
    | st.builds(lambda char: "\\" + char, st.characters(exclude_characters=CONTROL, codec="utf-8")),
    max_size=8,
).map(lambda parts: '"' + "".join(parts) + '"')
COMMENTS = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=12).map(lambda s: "#" + s)
INDENTS = st.sampled_from(["", "  ", "    ", "\t", " \t", "\f ", "      "])
BOUNDS = st.builds(
    lambda subject, op, limit: [subject, op, *limit],
    NAMES, st.sampled_from([">=", "<=", "==", "<", ">"]), st.one_of(NUMBERS.map(lambda n: [n]),
                                                                   QUANTITIES.map(lambda q: [q]), FRACTIONS),
)
SCALARS = st.one_of(  # token lists
    NUMBERS.map(lambda n: [n]),
    QUANTITIES.map(lambda q: [q]),
    FRACTIONS,
    STRINGS.map(lambda s: [s]),
    NAMES.map(lambda n: [n]),
    st.tuples(NUMBERS | QUANTITIES, NAMES).map(list),  # a measure: 16x params
    BOUNDS,
)


def _commas(draw, parts: list[list[str]]) -> list[str]:
    tokens: list[str] = []
    for index, part in enumerate(parts):
        tokens += part + ([","] if index < len(parts) - 1 else [])
    if parts and draw(st.booleans()):
        tokens.append(",")
    return tokens


def value_tokens(draw, depth: int = 0) -> list[str]:
    """The tokens of a random value: a scalar, a call with keyword arguments, or a list."""
    kind = draw(st.sampled_from(["scalar", "scalar", "call", "list"] if depth < 3 else ["scalar"]))
    if kind == "scalar":
        return draw(SCALARS)
    count = draw(st.integers(0, 4))
    if kind == "list":
        return ["[", *_commas(draw, [value_tokens(draw, depth + 1) for _ in range(count)]), "]"]
    args = [([draw(NAMES), "="] if draw(st.booleans()) else []) + value_tokens(draw, depth + 1) for _ in range(count)]
    return [draw(NAMES), "(", *_commas(draw, args), ")"]


def join_tokens(draw, tokens: list[str], nl: str) -> str:
    """Tokens with random spacing; inside brackets also line breaks, with or without comments."""
    text, brackets = tokens[0], 0
    for before, token in pairwise(tokens):
        brackets += (before in ("(", "[")) - (before in (")", "]"))
        gaps = [" ", "  ", "\t"] + ([""] if before in PUNCT or token in PUNCT else [])
        if brackets > 0:
            gaps += [nl + draw(INDENTS), "  " + draw(COMMENTS) + nl + draw(INDENTS)]
        text += draw(st.sampled_from(gaps)) + token
    return text


def filler(draw, nl: str) -> str:
    """Blank lines and own-line comments, at random indentation."""
    lines = draw(st.lists(st.one_of(st.just(""), st.sampled_from([" ", "\t", "  \f"]), COMMENTS), max_size=2))
    return "".join(draw(INDENTS) + line + nl for line in lines)


def line_end(draw, nl: str) -> str:
    """The end of an item's line: maybe a trailing comment."""
    return draw(st.sampled_from(["", "  " + draw(COMMENTS), " " + draw(COMMENTS), "\t"])) + nl


def item_text(draw, depth: int, nl: str, top: bool) -> str:
    """One item (without its line ending): a block, a setting or a requirement."""
    kind = draw(st.sampled_from(["block", "block", "attribute", "require"] if depth < 3 else ["attribute", "require"]))
    if top and kind != "block" and draw(st.booleans()):
        kind = "block"
    if kind == "attribute":
        return join_tokens(draw, [draw(NAMES), "=", *value_tokens(draw)], nl)
    if kind == "require":
        return join_tokens(draw, ["require", *draw(BOUNDS)], nl)
    header = join_tokens(draw, [draw(NAMES), *draw(st.lists(STRINGS | NAMES, max_size=2)), "{"], nl)
    items = [item_text(draw, depth + 1, nl, False) for _ in range(draw(st.integers(0, 3)))]
    if len(items) <= 1 and draw(st.booleans()):  # a { b = 1 }  or  a {}
        return header + (" " + items[0] + " " if items else draw(st.sampled_from(["", " "]))) + "}"
    text = header
    for index, item in enumerate(items):
        if index == 0 and draw(st.booleans()):  # a { b = 1
            text += " " + item
        else:
            text += line_end(draw, nl) + filler(draw, nl) + draw(INDENTS) + item
    if items and draw(st.booleans()):  # c = 3 }
        return text + " }"
    return text + line_end(draw, nl) + filler(draw, nl) + draw(INDENTS) + "}"


@st.composite
def recipes(draw) -> str:
    """A random, syntactically valid recipe with free layout and comments everywhere."""
    nl = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = filler(draw, nl)
    if draw(st.booleans()):
        text += "extend " + draw(STRINGS) + line_end(draw, nl)
    for _ in range(draw(st.integers(0, 4))):
        text += filler(draw, nl) + draw(INDENTS) + item_text(draw, 0, nl, True) + line_end(draw, nl)
    text += filler(draw, nl)
    return text.removesuffix(nl) if draw(st.booleans()) else text


@_settings(120)
@given(text=recipes())
@example("a {\n  x = [1, # one\n  2]\n}\n")
@example("a { # open\n}  # close\n")
def test_format_properties_of_generated_recipes(text):
    """On random recipes with free layout, fmt is idempotent and keeps the tree and the comments."""
    assert_format_properties(text)
