"""Lark and regex grammars passed as grammar=.

Thousands of chained rules (the compiler recurses once per rule), deep parentheses,
huge alternations and repetition counts, left recursion, invalid syntax, unknown
kinds, NUL bytes and lone surrogates. A grammar that cannot be compiled, or is over
the size limits, must fail at submit with InvalidRequestError.
"""

from __future__ import annotations

import random

from ..constraints import Grammar


def G(kind, data):
    """Build the Grammar when the case runs: its constructor is part of what is fuzzed."""
    return lambda: Grammar(kind, data)
from .context import DRIVES, HELLO, drive


def g_chain(r):
    n = r.choice((100, 1000, 3000, 10000, 50000))
    rules = "\n".join(f"r{i}: r{i + 1} \"a\"" for i in range(n))
    return "lark_chained_rules", f"{n} chained Lark rules", G("lark", f"start: r0\n{rules}\nr{n}: \"z\"\n")


def g_nest(r):
    depth = r.choice((100, 1000, 10000, 100000))
    kind = r.choice(("lark", "regex"))
    body = "(" * depth + "a" + ")" * depth
    text = f"start: {body}\n" if kind == "lark" else body
    return f"{kind}_deep_nesting", f"{kind} with {depth} nested parentheses", G(kind, text)


def g_alternation(r):
    n = r.choice((1000, 10000, 100000))
    if r.random() < 0.5:
        return "lark_alternation", f"Lark rule of {n} literal alternatives", G(
            "lark", "start: " + " | ".join(f'"w{i}"' for i in range(n)) + "\n")
    return "regex_alternation", f"regex of {n} alternatives", G("regex", "|".join(f"w{i}" for i in range(n)))


def g_regex(r):
    pat = r.choice(("(a+)+$", "a{100000}", "a{1000000000}", "a{2,1}", "(?=a)b", "(a)\\1", "[z-a]", "(", ")",
                    "\\", "[", "a**", "(?P<x>a)(?P=x)", "\\p{Bogus}", "\\u{110000}", "[^\\x00-\\x{10FFFF}]",
                    "(a|b)*c{5000}", ".*" * 200, "(?i)" * 1000, "", "\0", "\ud800", "\\x00*", "a{0}",
                    "((a{1000}){1000}){1000}", "[\\s\\S]{1,100000}"))
    return "regex_syntax", f"regex {pat[:60]!r}", G("regex", pat)


def g_lark_syntax(r):
    text = r.choice((
        "", "start:", "start: start", "start: start \"a\" | \"a\"", "start: a\na: start", "start: \"a\"\nstart: \"b\"",
        "start: missing_rule", "start: /(/", "start: %json {", "start: %json {\"type\": 5}", "%import common.WS",
        "%ignore \" \"\nstart: \"a\"", "start: \"unterminated", "start: \"a\"{1000000000}", "start: \"a\"~1000000",
        "start: (\"a\"", "start: \"a\" \"b\" ->", "start: \0", "start: \"\ud800\"", "start: [[[[[[]]]]]]",
        "start: %regex {\"substring_words\": 5}", "start: <[1,2,3]>", "start: <[99999999]>", "start: %llguidance {}",
        "start: @sub\nsub: %lark { start: @start }", "start: A\nA: A", "start: A\nA: B\nB: A",
        "start: \"" + "\\" * 1001 + "\"", "start : \"a\" | " * 5000 + "\"b\"",
    ))
    return "lark_syntax", f"Lark {text[:70]!r}", G("lark", text)


def g_kind(r):
    kind = r.choice(("bogus", "", "LARK", "json_object", "gbnf", None, 5))
    data = r.choice(("start: \"a\"", "{}", "a+", "root ::= \"a\""))
    return "grammar_kind", f"G(kind={kind!r}, data={data!r})", G(kind, data)


def g_data_type(r):
    data = r.choice((None, 5, b"start: \"a\"", ["start: \"a\""], {"a": 1}))
    return "grammar_data_type", f"G('lark', {data!r})", G("lark", data)


def g_wrong_object(r):
    g = r.choice(("start: \"a\"", 5, {"kind": "lark", "data": "start: \"a\""}, ("lark", "start: \"a\"")))
    return "grammar_object", f"grammar={g!r} (not a Grammar)", lambda: g


GRAMMARS = (g_chain, g_chain, g_nest, g_alternation, g_regex, g_regex, g_lark_syntax, g_lark_syntax, g_kind,
            g_data_type, g_wrong_object)


def make(r: random.Random):
    label, desc, build = r.choice(GRAMMARS)(r)
    how = r.choice(DRIVES)
    max_tokens = r.choice((1, 8, 32))

    def run(ctx):
        drive(ctx.shared_engine(), how, messages=HELLO, grammar=build(), max_tokens=max_tokens)

    return label, f"{desc}; {how}, max_tokens={max_tokens}", run
