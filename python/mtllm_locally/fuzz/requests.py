"""Requests as a concurrent program makes them: adapter ids and scales, token-id
prompts, cancels from threads and asyncio, queue overflow, closing under load,
adapters unloaded mid-request, tokenizer and control calls with bad arguments.
Each must end in a normal result or an MtllmError, and leave the engine serving.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

from .adapters import SCALES
from .context import DRIVES, HELLO, drive
from .corpus import short

ODD_IDS = (-1, 0, 1, 999, 2**31 - 1, 2**31, 2**63, -2**63, 2**64, "1", None, 1.5, True)


def r_adapter_ids(r):
    how = r.choice(DRIVES)
    shape = r.choice(("id", "id", "scale", "structure"))
    if shape == "id":
        aid, scale = r.choice(ODD_IDS), 1.0
        adapters = "ID"
        desc = f"adapters=[({aid!r}, 1.0)]"
    elif shape == "scale":
        aid, scale = "VALID", r.choice(SCALES + ("1", None, 2**1000))
        adapters = "ID"
        desc = f"a loaded adapter at scale {scale!r}"
    else:
        aid, scale = None, None
        adapters = r.choice(([1], [(1,)], [(1, 2.0, 3)], {1: 1.0}, "a", 5, [("VALID", 1.0)] * 1000, [None]))
        desc = f"adapters={short(adapters, 60)}"

    def run(ctx):
        eng = ctx.shared_engine()
        valid = eng.load_adapter(ctx.lora_path) if (aid == "VALID" or adapters != "ID") else None
        try:
            if adapters == "ID":
                ad = [(valid if aid == "VALID" else aid, scale)]
            elif isinstance(adapters, list):
                ad = [(valid, 1.0) if a == ("VALID", 1.0) else a for a in adapters]
            else:
                ad = adapters
            drive(eng, how, messages=HELLO, max_tokens=4, adapters=ad)
        finally:
            if valid is not None:
                eng.unload_adapter(valid)

    return "adapter_ids" if shape != "scale" else "adapter_scale", f"{desc}; {how}", run


def r_prompt(r):
    prompt = r.choice(([-1], [49152], [2**31], [2**63], [2**64], [], [0] * 100000, [1.0], [True], (1, 2), "",
                       None, b"hello", "\ud800", [[1, 2]], [-2**31], "<|im_start|>" * 100, "a" * 100000))
    both = r.random() < 0.15
    how = r.choice(DRIVES)

    def run(ctx):
        kw = {"messages": HELLO} if both else {}
        drive(ctx.shared_engine(), how, prompt, max_tokens=4, **kw)

    return "prompt", f"prompt={short(prompt, 60)}{' and messages' if both else ''}; {how}", run


def r_cancel(r):
    n = r.choice((1, 4, 16))
    when = r.choice(("immediately", "after first chunk", "after finish", "twice", "from another thread"))
    stream = r.random() < 0.5

    def run(ctx):
        eng = ctx.shared_engine()
        reqs = [eng.submit(messages=HELLO, max_tokens=64, ignore_eos=True) for _ in range(n)]
        for req in reqs:
            if when == "after first chunk":
                next(iter(req), None)
            elif when == "after finish":
                req.result()
            if when == "from another thread":
                t = threading.Thread(target=req.cancel)
                t.start()
                t.join()
            else:
                req.cancel()
                if when == "twice":
                    req.cancel()
        for req in reqs:
            if stream:
                for _ in req:
                    pass
            else:
                req.result()
            req.cancel()

    return "cancel", f"{n} requests cancelled {when}, then {'iterated' if stream else 'result()'}", run


def r_async_cancel(r):
    n = r.choice((1, 8, 50))
    delays = [r.choice((0.0, 0.001, 0.01, 0.05)) for _ in range(n)]
    kinds = [r.choice(("agenerate", "astream", "astream_break")) for _ in range(n)]

    async def one(eng, kind):
        if kind == "agenerate":
            await eng.agenerate(messages=HELLO, max_tokens=48, ignore_eos=True)
        else:
            async for _ in eng.astream(messages=HELLO, max_tokens=48, ignore_eos=True):
                if kind == "astream_break":
                    break

    async def storm(eng):
        tasks = [asyncio.create_task(one(eng, k)) for k in kinds]
        for t, d in zip(tasks, delays):
            await asyncio.sleep(d)
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass

    def run(ctx):
        asyncio.run(storm(ctx.shared_engine()))

    return "async_cancel", f"{n} asyncio tasks ({', '.join(sorted(set(kinds)))}) cancelled after {sorted(set(delays))} s", run


def r_overload(r):
    n = r.choice((20, 200))

    def run(ctx):
        eng = ctx.new_engine(max_queued=2, max_running=1)
        reqs = []
        try:
            for _ in range(n):
                reqs.append(eng.submit(messages=HELLO, max_tokens=8))
        finally:
            for q in reqs:
                q.cancel()

    return "overload", f"{n} submits to an engine with max_queued=2, max_running=1", run


def r_close(r):
    when = r.choice(("in flight", "then submit", "twice", "then stream", "then load_adapter", "from thread",
                     "async in flight"))

    def run(ctx):
        eng = ctx.new_engine()
        if when == "in flight":
            reqs = [eng.submit(messages=HELLO, max_tokens=200, ignore_eos=True) for _ in range(8)]
            time.sleep(0.01)
            eng.close()
            for q in reqs:
                q.result()
        elif when == "from thread":
            req = eng.submit(messages=HELLO, max_tokens=200, ignore_eos=True)
            t = threading.Thread(target=eng.close)
            t.start()
            for _ in req:
                pass
            t.join()
        elif when == "async in flight":
            async def go():
                task = asyncio.create_task(eng.agenerate(messages=HELLO, max_tokens=200, ignore_eos=True))
                await asyncio.sleep(0.01)
                eng.close()
                await task

            asyncio.run(go())
        else:
            eng.close()
            if when == "then submit":
                eng.generate(messages=HELLO, max_tokens=2)
            elif when == "twice":
                eng.close()
            elif when == "then stream":
                for _ in eng.stream(messages=HELLO, max_tokens=2):
                    pass
            else:
                eng.load_adapter(ctx.lora_path)

    return "close", f"engine closed {when}", run


def r_unload_mid_request(r):
    n = r.choice((1, 4, 12))
    reload = r.random() < 0.5

    def run(ctx):
        eng = ctx.shared_engine()
        aid = eng.load_adapter(ctx.lora_path)
        reqs = [eng.submit(messages=HELLO, max_tokens=64, ignore_eos=True, adapters=[(aid, 1.0)]) for _ in range(n)]
        time.sleep(0.005)
        eng.unload_adapter(aid)
        if reload:
            aid2 = eng.load_adapter(ctx.lora_path)
            eng.generate(messages=HELLO, max_tokens=4, adapters=[(aid2, 1.0)])
            eng.unload_adapter(aid2)
        for q in reqs:
            q.result()
        eng.generate(messages=HELLO, max_tokens=2, adapters=[(aid, 1.0)])  # unloaded: InvalidRequestError

    return "unload_mid_request", f"adapter unloaded under {n} requests{', then reloaded' if reload else ''}", run


def r_calls(r):
    call, arg = r.choice((
        ("tokenize", 5), ("tokenize", None), ("tokenize", "\ud800"), ("tokenize", "x" * (1 << 22)),
        ("tokenize", b"abc"), ("detokenize", [-1]), ("detokenize", [2**40]), ("detokenize", ["a"]),
        ("detokenize", None), ("detokenize", [49152]), ("set_threads", -1), ("set_threads", 10**6),
        ("set_threads", "2"), ("set_threads", 2**31), ("unload_adapter", -1), ("unload_adapter", 2**63),
        ("unload_adapter", "x"), ("load_adapter", "/nonexistent"), ("load_adapter", "/"), ("load_adapter", 5),
        ("load_adapter", "MODEL"), ("render", 5), ("logits", None), ("encode_chat", [{"role": "user"}]),
    ))

    def run(ctx):
        eng = ctx.shared_engine()
        if call == "logits":
            req = eng.submit(messages=HELLO, max_tokens=2)
            req.logits()
            req.result()
            req.logits()
        elif call == "load_adapter" and arg == "MODEL":
            eng.unload_adapter(eng.load_adapter(ctx.tiny_path))  # a model, not an adapter
        elif call in ("render", "encode_chat"):
            getattr(eng, call)(arg)
        else:
            getattr(eng, call)(arg)
        if call == "set_threads":
            eng.set_threads(0)

    return "call_" + call, f"engine.{call}({short(arg, 50)})", run


KINDS = (r_adapter_ids, r_adapter_ids, r_prompt, r_prompt, r_cancel, r_async_cancel, r_overload, r_close,
         r_unload_mid_request, r_calls, r_calls)


def make(r: random.Random):
    return r.choice(KINDS)(r)
