"""Robustness bench: the engine inside a host program must never end or wedge it.

Three parts, each what a long-running Jac or Python program does to the engine:
  fuzz         the seeded fuzz corpus (mtllm_locally.fuzz) at full size: model and
               adapter files, schemas, grammars, sampling, messages, templates,
               settings, request patterns; every case in a child process.
  soak         64 concurrent mixed requests on the default model for --soak-seconds:
               plain, streaming, JSON-schema constrained, on LoRA adapters that are
               loaded and unloaded while requests run, cancelled from threads and by
               asyncio task cancellation. RSS is taken after a warm-up round and at
               the end, both with nothing in flight and no adapter loaded.
  kv_pressure  an engine whose context is far too small for its requests together
               (n_ctx=256, max_running=4, no cached sequences; 40-token prompts with
               max_tokens=200 and ignore_eos): each must finish or fail cleanly.

Figures (goal in brackets):
  fuzz_crashes             cases whose child process died                       [0]
  fuzz_cases               cases tried                                          [>= 2000]
  soak_rss_growth          end RSS / start RSS after warm-up                    [<= 1.05]
  soak_stalled_requests    requests neither finished nor failed within 120 s    [0]
  kv_pressure_completed    fraction finished or failed cleanly in time          [1.0]
  fuzz_hangs_unclean_dead  fuzz cases that hung, raised a non-MtllmError, or
                           left the engine unable to serve                      [0]
  soak_unclean_requests    soak requests that raised a non-MtllmError           [0]
  soak_rss_growth_trimmed  the same after malloc_trim(0) at both ends: a leak
                           shows here, allocator slack only in soak_rss_growth  [<= 1.05]
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
import tempfile
import threading
import time
from collections import Counter

from .. import Engine, models
from ..errors import MtllmError

GOALS = {"fuzz_crashes": "== 0", "fuzz_cases": ">= 2000", "soak_rss_growth": "<= 1.05",
         "soak_stalled_requests": "== 0", "kv_pressure_completed": "== 1.0", "fuzz_hangs_unclean_dead": "== 0",
         "soak_unclean_requests": "== 0", "soak_rss_growth_trimmed": "<= 1.05"}
SEED = 11
REQUEST_DEADLINE_S = 120.0   # generous: a 64-deep queue on 2 cores drains in well under a minute
CONCURRENCY = 64
ASYNC_SHARE = 16             # of the 64, this many are asyncio tasks (on one event loop)

SENTIMENT = {"type": "object", "properties": {
    "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["sentiment", "confidence"], "additionalProperties": False}
TYPED_RF = {"type": "json_schema", "json_schema": {"name": "Sentiment", "schema": SENTIMENT, "strict": True}}
TOPICS = ("a lighthouse", "rain in April", "a chess game", "bread", "the moon", "a lost key", "trains", "owls")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_now() -> tuple[int, int]:
    """(RSS, RSS after glibc returns its free pages): the first is what the host sees,
    the second tells a leak from allocator slack."""
    gc.collect()
    time.sleep(1.0)
    raw = rss_bytes()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return raw, rss_bytes()


# ---------------------------------------------------------------- fuzz
def run_fuzz_part(n_cases: int, log, jobs: int) -> dict:
    from ..fuzz import run_fuzz

    result = run_fuzz(n_cases, seed=SEED, jobs=jobs, timeout=30.0, batch=25,
                      log=lambda *a: log("     ", *a))
    log("      " + result.report().replace("\n", "\n      "))
    d = result.to_dict()
    d.pop("failures")  # the classes keep one example each; the full list is in the log
    return d


# ---------------------------------------------------------------- soak
class _Ledger:
    """Every soak request: when it started, how it ended, and how long it took."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.open: dict[int, tuple[float, str, object]] = {}   # id -> (t0, kind, native Request or None)
        self.ended: Counter = Counter()
        self.late: int = 0
        self.unclean: Counter = Counter()
        self.latencies: list[float] = []

    def start(self, kind: str, req=None) -> int:
        with self._lock:
            rid = next(self._ids)
            self.open[rid] = (time.monotonic(), kind, req)
            return rid

    def attach(self, rid: int, req) -> None:
        with self._lock:
            t0, kind, _ = self.open[rid]
            self.open[rid] = (t0, kind, req)

    def end(self, rid: int, outcome: str) -> None:
        with self._lock:
            t0, kind, _ = self.open.pop(rid)
            dt = time.monotonic() - t0
            self.latencies.append(dt)
            if dt > REQUEST_DEADLINE_S:
                self.late += 1
            self.ended[f"{kind}:{outcome if not outcome.startswith('unclean') else 'unclean'}"] += 1
            if outcome.startswith("unclean"):
                self.unclean[outcome] += 1

    def open_kinds(self) -> list[str]:
        with self._lock:
            return [kind for _, kind, _ in self.open.values()]

    def overdue(self) -> list[tuple[int, object]]:
        now = time.monotonic()
        with self._lock:
            return [(rid, req) for rid, (t0, _, req) in self.open.items() if now - t0 > REQUEST_DEADLINE_S]


def _outcome(e: BaseException | None) -> str:
    if e is None:
        return "ok"
    if isinstance(e, MtllmError):
        return f"clean:{type(e).__name__}"
    if isinstance(e, (asyncio.CancelledError, asyncio.TimeoutError)):
        return "cancelled"
    return f"unclean:{type(e).__name__}: {str(e)[:120]}"


class _Soak:
    def __init__(self, eng: Engine, adapter_files: list[str], seed: int):
        self.eng = eng
        self.files = adapter_files
        self.ledger = _Ledger()
        self.live: list[int] = []          # adapter ids currently loaded
        self.live_lock = threading.Lock()
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        self.adapter_events: Counter = Counter()

    # ---- what one request looks like
    def _request_kw(self, r: random.Random) -> tuple[str, dict]:
        kind = r.choice(("plain", "stream", "typed", "adapter", "adapter_stream", "cancel"))
        topic = r.choice(TOPICS)
        kw: dict = {"messages": [{"role": "user", "content": f"Write two sentences about {topic}."}],
                    "max_tokens": r.choice((8, 16, 32, 48)), "temperature": r.choice((0.0, 0.7)), "seed": r.randrange(1000)}
        if kind == "typed":
            kw["messages"] = [{"role": "system", "content": "Classify the sentiment. Answer in JSON."},
                              {"role": "user", "content": f"I think {topic} is wonderful."}]
            kw["response_format"] = TYPED_RF
        if kind.startswith("adapter"):
            with self.live_lock:
                if self.live:
                    kw["adapters"] = [(r.choice(self.live), r.choice((0.5, 1.0)))]
        return kind, kw

    # ---- thread workers
    def _thread_worker(self, wid: int) -> None:
        r = random.Random(self.rng.random() + wid)
        while not self.stop.is_set():
            kind, kw = self._request_kw(r)
            rid = self.ledger.start(kind)
            err = None
            try:
                req = self.eng.submit(**kw)
                self.ledger.attach(rid, req)
                if kind in ("stream", "adapter_stream"):
                    for k, _ in enumerate(req):
                        if k == 3 and r.random() < 0.2:
                            req.cancel()  # a consumer that stops reading
                elif kind == "cancel":
                    time.sleep(r.choice((0.0, 0.01, 0.1, 0.5)))
                    req.cancel()
                    req.result()
                else:
                    req.result()
            except BaseException as e:  # noqa: BLE001 - sorted into clean / unclean
                err = e
            self.ledger.end(rid, _outcome(err))

    # ---- asyncio workers
    async def _async_worker(self, wid: int) -> None:
        r = random.Random(self.rng.random() + 1000 + wid)
        while not self.stop.is_set():
            kind, kw = self._request_kw(r)
            kind = "async_" + kind
            rid = self.ledger.start(kind)
            err = None
            try:
                if kind.endswith("stream"):
                    async def consume():
                        async for _ in self.eng.astream(**kw):
                            pass

                    coro = consume()
                else:
                    coro = self.eng.agenerate(**kw)
                task = asyncio.ensure_future(coro)
                if kind == "async_cancel":
                    await asyncio.sleep(r.choice((0.0, 0.01, 0.1, 0.5)))
                    task.cancel()
                await asyncio.wait_for(task, REQUEST_DEADLINE_S * 1.5)
            except BaseException as e:  # noqa: BLE001
                err = e
            self.ledger.end(rid, _outcome(err))

    def _async_main(self, n: int) -> None:
        async def main():
            await asyncio.gather(*(self._async_worker(i) for i in range(n)))

        asyncio.run(main())

    # ---- adapters loaded and unloaded under load
    def _adapter_churn(self) -> None:
        r = random.Random(self.rng.random())
        while not self.stop.wait(r.uniform(0.5, 2.0)):
            try:
                aid = self.eng.load_adapter(r.choice(self.files))
                self.adapter_events["loaded"] += 1
                with self.live_lock:
                    self.live.append(aid)
                    old = self.live.pop(0) if len(self.live) > 2 else None  # keep two or three live
                if old is not None:
                    self.eng.unload_adapter(old)  # requests using it finish first
                    self.adapter_events["unloaded"] += 1
            except MtllmError as e:
                self.adapter_events[f"clean:{type(e).__name__}"] += 1
            except Exception as e:  # noqa: BLE001
                self.adapter_events[f"unclean:{type(e).__name__}"] += 1

    def _watchdog(self) -> None:
        flagged: set[int] = set()
        while not self.stop.wait(1.0):
            for rid, req in self.ledger.overdue():
                if rid not in flagged and req is not None:
                    flagged.add(rid)
                    req.cancel()  # unblocks the worker if the engine still honours cancels

    def unload_all(self) -> None:
        with self.live_lock:
            ids, self.live = list(self.live), []
        for aid in ids:
            self.eng.unload_adapter(aid)

    def run_for(self, seconds: float, drain_s: float) -> dict:
        """Run the mix for `seconds`, then stop issuing and wait up to drain_s for the
        requests in flight. Returns what is still open (stalled) and the tallies."""
        self.stop.clear()
        n_async = ASYNC_SHARE
        threads = [threading.Thread(target=self._thread_worker, args=(i,), daemon=True)
                   for i in range(CONCURRENCY - n_async)]
        threads.append(threading.Thread(target=self._async_main, args=(n_async,), daemon=True))
        threads.append(threading.Thread(target=self._adapter_churn, daemon=True))
        threads.append(threading.Thread(target=self._watchdog, daemon=True))
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        deadline = time.monotonic() + drain_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stalled = self.ledger.open_kinds()
        return {"still_open": len(stalled), "still_open_kinds": dict(Counter(stalled)),
                "workers_stuck": sum(t.is_alive() for t in threads)}


def run_soak(seconds: float, log) -> dict:
    warmup_s = min(60.0, max(5.0, seconds / 10))
    from ..fuzz.tiny import lora_for

    served = str(models.resolve(None))
    with tempfile.TemporaryDirectory(prefix="mtllm-soak-") as tmp:
        files = []
        for i in range(4):  # random LoRAs of ranks 4..16 on every attention and MLP projection
            p = os.path.join(tmp, f"soak-lora{i}.gguf")
            lora_for(served, rank=4 * (i + 1), seed=i).write(p)
            files.append(p)
        return _soak_with(files, seconds, warmup_s, log)


def _soak_with(files: list[str], seconds: float, warmup_s: float, log) -> dict:
    with Engine(None, n_ctx=4096) as eng:
        soak = _Soak(eng, files, SEED)
        log(f"      warm-up: {CONCURRENCY} concurrent for {warmup_s:.0f} s")
        warm = soak.run_for(warmup_s, REQUEST_DEADLINE_S)
        soak.unload_all()
        rss_start, trimmed_start = rss_now()
        warm_done = sum(soak.ledger.ended.values())
        log(f"      RSS after warm-up {rss_start / 2**20:.0f} MiB ({warm_done} requests); soaking {seconds:.0f} s")
        t0 = time.monotonic()
        main = soak.run_for(seconds, REQUEST_DEADLINE_S)
        elapsed = time.monotonic() - t0
        soak.unload_all()
        rss_end, trimmed_end = rss_now()
        st = eng.stats()
    ledger = soak.ledger
    total = sum(ledger.ended.values()) - warm_done
    stalled = ledger.late + main["still_open"]  # (open at the end includes any left from warm-up)
    lat = sorted(ledger.latencies)
    out = {"seconds": seconds, "warmup_s": warmup_s, "concurrency": CONCURRENCY, "requests": total,
           "requests_per_s": total / elapsed, "outcomes": dict(sorted(ledger.ended.items())),
           "unclean": dict(ledger.unclean), "stalled": stalled, "late": ledger.late,
           "open_after_warmup": warm["still_open"], "open_at_end": main["still_open_kinds"],
           "workers_stuck": main["workers_stuck"],
           "adapter_events": dict(soak.adapter_events), "rss_start_mb": rss_start / 2**20,
           "rss_end_mb": rss_end / 2**20, "rss_growth": rss_end / rss_start if rss_start else float("nan"),
           "rss_trimmed_start_mb": trimmed_start / 2**20, "rss_trimmed_end_mb": trimmed_end / 2**20,
           "rss_growth_trimmed": trimmed_end / trimmed_start if trimmed_start else float("nan"),
           "latency_p50_s": lat[len(lat) // 2] if lat else 0.0, "latency_max_s": lat[-1] if lat else 0.0,
           "engine_stats": {k: v for k, v in st.items() if isinstance(v, (int, float))}}
    log(f"      {total} requests ({out['requests_per_s']:.1f}/s), stalled {stalled}, unclean "
        f"{sum(ledger.unclean.values())}; adapters {dict(soak.adapter_events)}; RSS {out['rss_start_mb']:.0f} -> "
        f"{out['rss_end_mb']:.0f} MiB (x{out['rss_growth']:.3f}; after malloc_trim {out['rss_trimmed_start_mb']:.0f} -> "
        f"{out['rss_trimmed_end_mb']:.0f}, x{out['rss_growth_trimmed']:.3f}); latency p50 {out['latency_p50_s']:.1f} s, "
        f"max {out['latency_max_s']:.1f} s")
    return out


# ---------------------------------------------------------------- KV pressure
def run_kv_pressure(n_requests: int, deadline_s: float, log) -> dict:
    eng = Engine(None, n_ctx=256, max_running=4, cache_sequences=0)
    text = " ".join(f"Item {i} is a small red box with a label." for i in range(40))
    ids = eng.tokenize(text, add_special=False)[:40]
    t0 = time.monotonic()
    reqs, outcomes = [], []
    for _ in range(n_requests):
        try:
            reqs.append(eng.submit(ids, max_tokens=200, ignore_eos=True))
        except MtllmError as e:
            outcomes.append(f"clean:{type(e).__name__}")
    for req in reqs:
        try:
            c = req.result(timeout=max(0.0, deadline_s - (time.monotonic() - t0)))
            outcomes.append(f"finished:{c.finish_reason}")
        except TimeoutError:
            outcomes.append("stuck")
        except MtllmError as e:
            outcomes.append(f"clean:{type(e).__name__}")
        except Exception as e:  # noqa: BLE001
            outcomes.append(f"unclean:{type(e).__name__}")
    elapsed = time.monotonic() - t0
    for req in reqs:
        req.cancel()
    stats = eng.stats()
    closer = threading.Thread(target=eng.close, daemon=True)  # a livelocked engine may not close
    closer.start()
    closer.join(30)
    c = Counter(outcomes)
    good = sum(v for k, v in c.items() if k.startswith(("finished", "clean")))
    out = {"requests": n_requests, "deadline_s": deadline_s, "seconds": elapsed, "outcomes": dict(c),
           "completed": good / n_requests, "closed": not closer.is_alive(),
           "engine_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}}
    log(f"      {n_requests} requests of 40 + 200 tokens in n_ctx={eng.n_ctx}: {dict(c)} in {elapsed:.1f} s "
        f"-> {out['completed']:.2f} completed; engine {'closed' if out['closed'] else 'did NOT close'}")
    return out


def run(quick: bool = False, log=print, soak_seconds: float | None = None) -> dict:
    n_fuzz = 200 if quick else 2000
    soak_s = soak_seconds if soak_seconds is not None else (30.0 if quick else 600.0)
    jobs = max(1, min(4, (os.cpu_count() or 1)))
    result: dict = {"goals": GOALS, "seed": SEED, "threads": os.cpu_count()}

    log(f"[1/3] fuzz: {n_fuzz} seeded cases (seed {SEED}), each in a child process, {jobs} at a time")
    result["fuzz"] = run_fuzz_part(n_fuzz, log, jobs)

    log(f"[2/3] soak: {CONCURRENCY} concurrent mixed requests on the default model for {soak_s:.0f} s")
    result["soak"] = run_soak(soak_s, log)

    n_kv = 4 if quick else 8
    log(f"[3/3] KV pressure: {n_kv} requests that cannot all fit (n_ctx=256, max_running=4, cache_sequences=0)")
    result["kv_pressure"] = run_kv_pressure(n_kv, 60.0 if quick else 180.0, log)

    result["ratios"] = {
        "fuzz_crashes": result["fuzz"]["crashes"],
        "fuzz_cases": result["fuzz"]["cases"],
        "soak_rss_growth": result["soak"]["rss_growth"],
        "soak_stalled_requests": result["soak"]["stalled"],
        "kv_pressure_completed": result["kv_pressure"]["completed"],
        # not named in the goals of issue 11, but each is a bug of the same kind
        "fuzz_hangs_unclean_dead": result["fuzz"]["hangs"] + result["fuzz"]["unclean"] + result["fuzz"]["dead"],
        "soak_unclean_requests": sum(result["soak"]["unclean"].values()),
        # the same RSS with glibc's free pages returned first: growth here is a leak, the
        # difference to soak_rss_growth is allocator slack (64 threads, one arena each)
        "soak_rss_growth_trimmed": result["soak"]["rss_growth_trimmed"],
    }
    return result
