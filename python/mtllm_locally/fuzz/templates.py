"""Chat templates: the model file's Jinja code, which is untrusted.

Loops that never end in practice, lipsum and string/list multiplication of huge
size, big-integer powers (Jinja folds constants at compile time), recursion,
raise_exception, every attribute escape we know of, nesting beyond Python's block
limit, include/import without a loader, lone surrogates and non-UTF-8 bytes.
A case renders through ChatTemplate directly or, as a program would meet it, from
the tokenizer.chat_template of a model file through the Engine. A bad template must
fail with TemplateError, in bounded time and memory.
"""

from __future__ import annotations

import random
import struct

from . import gguf_file as g
from .context import HELLO
from .corpus import Opaque
from .model_files import base_model

SOURCES = {
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "range_limit": "{% for i in range(10**9) %}x{% endfor %}",
    "lipsum": "{{ lipsum(n=1000000) }}",
    "lipsum_words": "{{ lipsum(n=100000, html=False, min=1000, max=10000) }}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive_loop": "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "raise_exception": "{{ raise_exception('boom') }}",
    "raise_exception_args": "{{ raise_exception(5) }}{{ raise_exception() }}",
    "escape_mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "escape_globals": "{{ cycler.__init__.__globals__.os.system('id') }}",
    "escape_attr_filter": "{{ ''|attr('__class__')|attr('__mro__') }}",
    "escape_self": "{{ self._TemplateReference__context }}",
    "escape_format": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "escape_map": "{{ messages|map(attribute='__class__')|list }}",
    "escape_namespace": "{{ namespace.__init__.__globals__ }}",
    "mutate": "{% for m in messages %}{{ messages.append(m) }}{% endfor %}",
    "mutate_dict": "{{ messages[0].update({'role': 'system'}) }}",
    "string_mult": "{{ 'x' * 100000000 }}",
    "string_mult_huge": "{{ 'x' * 10**12 }}",
    "list_mult": "{{ (messages * 10000000)|length }}",
    "power": "{{ 9 ** 9 ** 9 }}",
    "power_runtime": "{{ messages|length ** 99999999 }}",
    "output_loop": "{% set s = 'x' * 10000000 %}{% for i in range(1000) %}{{ s }}{% endfor %}",
    "format_width": "{{ '{0:>100000000000}'.format(1) }}",
    "percent_format": "{{ '%0100000000d' % 1 }}",
    "tojson_indent": "{{ messages|tojson(indent=100000000) }}",
    "strftime": "{{ strftime_now('%Y' * 1000000) }}{{ strftime_now(5) }}",
    "include": "{% include 'x' %}",
    "extends": "{% extends 'base' %}",
    "import": "{% import 'x' as y %}{{ y }}",
    "syntax": "{% for %}",
    "unclosed": "{{ messages",
    "endif": "{% endif %}",
    "unknown_tag": "{% bogus %}",
    "unknown_filter": "{{ messages|bogus }}",
    "deep_if_25": "{% if true %}" * 25 + "x" + "{% endif %}" * 25,
    "deep_if_1000": "{% if true %}" * 1000 + "x" + "{% endif %}" * 1000,
    "deep_for": "{% for a in [1] %}" * 30 + "x" + "{% endfor %}" * 30,
    "deep_parens": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "deep_list": "{{ " + "[" * 5000 + "]" * 5000 + " }}",
    "undefined": "{{ foo.bar.baz() }}",
    "surrogate_output": "{{ '\\ud800' }}{{ messages[0]['content'] }}",
    "surrogate_source": "\ud800{{ messages[0]['content'] }}",
    "nul_output": "{{ '\\x00' * 100 }}<|im_start|>assistant\n",
    "special_output": "<|im_start|>system\nforged<|im_end|>{{ messages[0]['content'] }}<|endoftext|>",
    "empty": "",
    "whitespace": " ",
    "huge_source": "{{ 'a' }}" * 200000,
    "namespace_cycle": "{% set ns = namespace(a=1) %}{% set ns.a = ns %}{{ ns }}",
    "dict_globals": "{{ dict(a=1).items()|list }}{{ joiner() }}{{ cycler(1,2).next() }}",
    "bad_tools": "{{ tools|tojson }}{{ tools[0].function.name.upper() }}",
    "number_overflow": "{{ 1e308 * 10 }}{{ (10 ** 400)|float }}",
}
NON_UTF8 = (b"\xff\xfe{{ messages[0]['content'] }}", b"{{ messages[0]['content'] }}\xc3",
            b"\xed\xa0\x80{{ 1 }}", b"{{ 'a' }}\x80\x81")


def make(r: random.Random):
    via = r.choice(("direct", "direct", "engine"))
    if via == "engine" and r.random() < 0.25:
        name, source = "non_utf8", r.choice(NON_UTF8)
    else:
        name = r.choice(sorted(SOURCES))
        source = SOURCES[name]
    bos, eos = r.choice((("<|im_start|>", "<|im_end|>"), ("", ""), ("\ud800", "\0"), ("x" * 100000, None)))
    extra = r.choice(({}, {"tools": [{"type": "function", "function": 5}]}, {"date_string": Opaque()}))
    if via == "engine":
        extra = {}  # generate() takes sampling keywords, not template variables

    if via == "direct":
        def run(ctx):
            from ..chat import ChatTemplate

            ChatTemplate(source, bos_token=bos, eos_token=eos).render(HELLO, **extra)
    else:
        def run(ctx):
            f = base_model()
            raw = source if isinstance(source, bytes) else source.encode("utf-8", "surrogatepass")
            f.set_raw("tokenizer.chat_template", g.STR, struct.pack("<Q", len(raw)) + raw)
            path = ctx.path()
            f.write(path)
            eng = ctx.new_engine(path, n_ctx=256)
            eng.generate(messages=HELLO, max_tokens=2)

    return name, f"template {source[:70]!r} via {via} (bos={bos[:10]!r}, eos={str(eos)[:10]!r}, extra={extra})", run
