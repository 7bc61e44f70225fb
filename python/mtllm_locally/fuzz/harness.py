"""Run cases in child processes and sort what happened into the four failure kinds.

    crash    the child died (a signal, or an exit status other than 0) during a case
    hang     a case (or the engine check after it) did not finish within `timeout`
    unclean  a case raised something that is not an MtllmError
    dead     after a case, the child's engine no longer served a plain request

Cases run in batches, one child per batch, for speed. When a child crashes, the case
it was running is run again alone; if that does not crash, the cases before it in the
batch are run alone, latest first, to find one that crashes by itself; if none does,
the crash is reported as needing the whole sequence (its repro lists every case).
A hung child gets SIGABRT first (faulthandler prints where every thread is), then
SIGKILL; the rest of its batch continues in a new child.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAILURES = ("crash", "hang", "unclean", "dead")
STARTUP_S = 120.0   # import + the shared engine, on a loaded 2-core machine


@dataclass
class Outcome:
    index: int
    label: str
    desc: str
    outcome: str          # ok | clean | unclean | dead | crash | hang | error
    detail: str = ""
    phase: str = ""       # where a crash or hang happened: case | health | close
    repro: str = ""
    seconds: float = 0.0  # how long the case ran (not its engine check)


@dataclass
class FuzzResult:
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, what: str) -> int:
        return sum(o.outcome == what for o in self.outcomes)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(o.outcome for o in self.outcomes)
        return {"cases": len(self.outcomes), "ok": c["ok"], "clean": c["clean"], "crashes": c["crash"],
                "hangs": c["hang"], "unclean": c["unclean"], "dead": c["dead"], "harness_errors": c["error"]}

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.outcome in FAILURES + ("error",)]

    def classes(self) -> dict[tuple[str, str], list[Outcome]]:
        """Failures grouped by (outcome, input class)."""
        out: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
        for o in self.failures:
            out[(o.outcome, o.label)].append(o)
        return dict(sorted(out.items()))

    def seconds_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for o in self.outcomes:
            out[o.label.split("/")[0]] += o.seconds
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def to_dict(self) -> dict:
        return {"seed": self.seed, "seconds": round(self.seconds, 1), **self.counts,
                "case_seconds_by_kind": self.seconds_by_kind(),
                "classes": [{"outcome": k[0], "label": k[1], "n": len(v), "first": asdict(v[0])}
                            for k, v in self.classes().items()],
                "failures": [asdict(o) for o in self.failures]}

    def report(self) -> str:
        c = self.counts
        lines = [f"fuzz seed {self.seed}: {c['cases']} cases in {self.seconds:.0f} s: {c['crashes']} crashes, "
                 f"{c['hangs']} hangs, {c['unclean']} unclean, {c['dead']} dead engines "
                 f"({c['ok']} ok, {c['clean']} clean errors{', %d harness errors' % c['harness_errors'] if c['harness_errors'] else ''})"]
        for (outcome, label), items in self.classes().items():
            o = items[0]
            lines.append(f"  {outcome:7s} {label} x{len(items)}: {o.desc}")
            lines.append(f"          {headline(o.detail)[:400]}")
            lines.append(f"          repro: {o.repro}")
        slow = sorted((o for o in self.outcomes if o.seconds > 5), key=lambda o: -o.seconds)[:5]
        for o in slow:  # not failures, but a host program waited this long for one call
            lines.append(f"  slow    {o.label} {o.seconds:.1f} s ({o.outcome}): {o.desc[:160]}  [{o.repro}]")
        return "\n".join(lines)


_CAUSE = re.compile(r"GGML_ASSERT|GGML_ABORT|terminate called|what\(\)|failed:|error:|Error:|Segmentation|Aborted")


def headline(detail: str) -> str:
    """One line out of a crash's or hang's stderr: how it ended, the cause llama.cpp or
    the C++ runtime printed, and the innermost frame of the thread that was running."""
    lines = detail.splitlines()
    if not lines:
        return ""
    out = [lines[0]]
    cause = next((ln.strip() for ln in lines[1:] if _CAUSE.search(ln) and "Fatal Python error" not in ln), "")
    if cause:
        out.append(cause[:200])
    try:
        k = next(i for i, ln in enumerate(lines) if ln.startswith("Current thread"))
        frames = [ln.strip() for ln in lines[k + 1:] if ln.strip().startswith("File ")]
        ours = next((f for f in frames if "mtllm_locally" in f and "/fuzz/" not in f), frames[0] if frames else "")
        if ours:
            out.append("at " + ours.replace("File ", "", 1))
    except StopIteration:
        pass
    return " | ".join(out)


def repro(seed: int, indices, kinds=None) -> str:
    k = f" --kinds {','.join(kinds)}" if kinds else ""
    return f"python -m mtllm_locally.fuzz --seed {seed}{k} " + " ".join(f"--case {i}" for i in indices)


class _Child:
    """One child process and the lines it reports."""

    def __init__(self, job: dict, env: dict, stderr_path: Path):
        self.stderr_path = stderr_path
        self._err = open(stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mtllm_locally.fuzz.child", json.dumps(job)],
                                     stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                try:
                    self.lines.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
        except (ValueError, OSError):  # closed under us by kill()
            pass
        self.lines.put(None)  # EOF

    def next(self, timeout: float):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "timeout"

    def kill(self, dump_first: bool = False) -> None:
        if self.proc.poll() is None and dump_first:
            try:
                os.killpg(self.proc.pid, signal.SIGABRT)  # faulthandler prints the stacks
                self.proc.wait(3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.close()

    def close(self) -> None:
        self._err.close()
        self.proc.stdout.close()

    def exit_text(self) -> str:
        rc = self.proc.wait()
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        try:
            text = self.stderr_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            text = ""
        causes = [ln for ln in text.splitlines() if _CAUSE.search(ln) and "Fatal Python error" not in ln][:3]
        return "\n".join([how, *causes, text[-3000:]])


class Fuzzer:
    def __init__(self, seed: int = 0, *, batch: int = 25, timeout: float = 30.0, jobs: int = 1,
                 kinds: tuple[str, ...] | None = None, mem_limit: int = 6 << 30, workdir: str | None = None,
                 log=None):
        self.seed, self.batch, self.timeout, self.jobs, self.kinds = seed, batch, timeout, jobs, kinds
        self.mem_limit = mem_limit
        self.log = log or (lambda *a: None)
        self._own_tmp = None
        if workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="mtllm-fuzz-")
            workdir = self._own_tmp.name
        self.workdir = Path(workdir)
        self._prepare()

    def _prepare(self) -> None:
        from .tiny import tiny_llama, tiny_lora

        self.tiny = str(self.workdir / "tiny.gguf")
        self.lora = str(self.workdir / "tiny-lora.gguf")
        tiny_llama().write(self.tiny)
        tiny_lora().write(self.lora)
        (self.workdir / "home").mkdir(exist_ok=True)
        self.env = dict(os.environ)
        # vetting verdicts and conversions of this run stay in the run's directory
        self.env["MTLLM_LOCALLY_HOME"] = str(self.workdir / "home")
        self.env["PYTHONFAULTHANDLER"] = "1"
        self.env["GGML_NO_BACKTRACE"] = "1"  # ggml's gdb backtrace would bury the assert message
        pkg_root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = pkg_root + os.pathsep + self.env.get("PYTHONPATH", "")

    def close(self) -> None:
        if self._own_tmp is not None:
            self._own_tmp.cleanup()

    # ---------------------------------------------------------------- one child
    def _run(self, indices: list[int]) -> tuple[dict[int, Outcome], dict | None, list[int]]:
        """Run `indices` in one child until it ends. Returns (finished outcomes, the
        crash or hang that stopped it early (or None), the indices never started)."""
        job = {"seed": self.seed, "indices": indices, "workdir": str(self.workdir), "tiny": self.tiny,
               "lora": self.lora, "timeout": self.timeout, "kinds": list(self.kinds or ()),
               "mem_limit": self.mem_limit}
        fd, err = tempfile.mkstemp(prefix="child-", suffix=".stderr", dir=self.workdir)
        os.close(fd)
        child = _Child(job, self.env, Path(err))
        done: dict[int, Outcome] = {}
        current: dict | None = None
        phase = "startup"
        try:
            while True:
                msg = child.next(STARTUP_S if phase == "startup" else self.timeout + 5)
                if msg == "timeout" or msg is None:  # stuck, or the child exited
                    if msg is None:
                        child.proc.wait()
                        if child.proc.returncode == 0 and phase == "done":
                            return done, None, []
                    else:
                        child.kill(dump_first=True)
                    if phase == "startup":
                        raise RuntimeError(f"fuzz child failed to start:\n{child.exit_text()}")
                    if current is None and done:  # between cases or while closing: blame the last case
                        last = done.pop([j for j in indices if j in done][-1])
                        current = {"index": last.index, "label": last.label, "desc": last.desc}
                    elif current is None:
                        current = {"index": indices[0], "label": "?", "desc": "(before the case started)"}
                    if msg is None:
                        stop = dict(current, outcome="crash", phase=phase, detail=child.exit_text())
                    else:
                        stop = dict(current, outcome="hang", phase=phase,
                                    detail=f"no progress within {self.timeout:.0f} s\n{child.exit_text()}")
                    return done, stop, _after(indices, current["index"])
                if "failed" in msg:
                    raise RuntimeError(msg["failed"])
                if msg.get("ready"):
                    phase = "between"
                elif "start" in msg:
                    current, phase = {"index": msg["start"], "label": msg["label"], "desc": msg["desc"]}, "case"
                elif "health" in msg:
                    phase = "health"
                elif "end" in msg:
                    i = msg["end"]
                    done[i] = Outcome(i, current["label"], current["desc"], msg["outcome"], msg.get("error", ""),
                                      repro=repro(self.seed, [i], self.kinds), seconds=msg.get("seconds", 0.0))
                    current, phase = None, "between"
                elif msg.get("closing"):
                    phase = "close"
                elif msg.get("done"):
                    phase = "done"
        finally:
            child.kill()
            try:
                os.unlink(err)
            except OSError:
                pass

    # ---------------------------------------------------------------- a batch
    def run_batch(self, indices: list[int]) -> list[Outcome]:
        out: dict[int, Outcome] = {}
        pending = list(indices)
        while pending:
            done, stop, rest = self._run(pending)
            out.update(done)
            if stop is not None:
                i = stop["index"]
                o = Outcome(i, stop["label"], stop["desc"], stop["outcome"], stop["detail"], stop["phase"],
                            repro(self.seed, [i], self.kinds))
                if o.outcome == "crash":
                    o = self._pin(o, [j for j in pending if j in done])
                out[o.index] = o  # a case before i that crashes alone replaces its batch result
                if o.index != i:
                    out[i] = Outcome(i, stop["label"], stop["desc"], "ok",
                                     f"the crash here is case {o.index}'s, which crashes alone")
                self.log(f"    case {o.index}: {o.outcome} ({o.label})")
            pending = rest
        return [out[i] for i in indices if i in out]

    def _pin(self, o: Outcome, before: list[int]) -> Outcome:
        """A crash at case o.index in a batch: find the case that crashes by itself."""
        if not before:
            return o
        done, stop, _ = self._run([o.index])
        if stop is not None and stop["outcome"] == "crash":
            return Outcome(o.index, o.label, o.desc, "crash", stop["detail"], stop["phase"],
                           repro(self.seed, [o.index], self.kinds))
        for j in reversed(before):
            _, stop, _ = self._run([j])
            if stop is not None and stop["outcome"] == "crash":
                return Outcome(j, stop["label"], stop["desc"], "crash", stop["detail"], stop["phase"],
                               repro(self.seed, [j], self.kinds))
        o.detail = (f"crashes only after the cases before it in the same process "
                    f"({len(before)} cases; none crashes alone)\n" + o.detail)
        o.repro = repro(self.seed, before + [o.index], self.kinds)
        return o

    # ---------------------------------------------------------------- a run
    def run(self, n_cases: int, start: int = 0) -> FuzzResult:
        t0 = time.monotonic()
        indices = list(range(start, start + n_cases))
        batches = [indices[k:k + self.batch] for k in range(0, len(indices), self.batch)]
        result = FuzzResult(self.seed)
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            for k, outcomes in enumerate(pool.map(self.run_batch, batches)):
                result.outcomes.extend(outcomes)
                bad = sum(o.outcome in FAILURES for o in outcomes)
                self.log(f"  batch {k + 1}/{len(batches)}: cases {batches[k][0]}-{batches[k][-1]}, "
                         f"{bad} failures ({time.monotonic() - t0:.0f} s)")
        result.seconds = time.monotonic() - t0
        return result


def _after(indices: list[int], i: int) -> list[int]:
    return indices[indices.index(i) + 1:]


def run_fuzz(n_cases: int, seed: int = 0, *, start: int = 0, log=None, **kw) -> FuzzResult:
    """Run cases start .. start + n_cases - 1 of `seed`; see Fuzzer for the knobs."""
    fz = Fuzzer(seed, log=log, **kw)
    try:
        return fz.run(n_cases, start)
    finally:
        fz.close()
