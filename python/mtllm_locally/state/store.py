"""The call store: every `by llm()` call, its model turns, and feedback, in SQLite.

Serve writes, learn reads. WAL mode so a running program and a trainer (or several
programs) share one file; the schema (calls, turns and feedback here; adapter versions
and deployments, read and written through `registry.py`) is versioned and migrated
forward in a transaction, and a store written by a newer version is refused rather
than damaged. Everything under the store is its owner's only (files.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import MtllmError
from .files import PRIVATE_FILE, make_private, private_dir

STORE_DIRNAME = ".mtllm_locally"  # the default store directory: ours entirely, so it is made private too


class StoreError(MtllmError):
    """The store cannot be opened or is from a newer version."""


MIGRATIONS: tuple[str, ...] = (
    # v1
    """
    CREATE TABLE calls (
        invocation_id   TEXT PRIMARY KEY,
        task_key        TEXT NOT NULL,
        function        TEXT,
        created_at      REAL NOT NULL,
        model           TEXT,
        adapter         TEXT,
        inputs_json     TEXT,
        output_text     TEXT,
        accepted        INTEGER,            -- NULL: unknown (not called through byllm)
        error           TEXT,
        latency_ms      REAL,
        prompt_tokens   INTEGER DEFAULT 0,
        completion_tokens INTEGER DEFAULT 0,
        temperature     REAL,
        n_turns         INTEGER DEFAULT 0
    );
    CREATE INDEX calls_task ON calls(task_key, created_at);
    CREATE TABLE turns (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        invocation_id   TEXT NOT NULL REFERENCES calls(invocation_id),
        turn_index      INTEGER NOT NULL,
        created_at      REAL NOT NULL,
        messages_json   TEXT NOT NULL,
        response_format_json TEXT,
        tools_json      TEXT,
        output_text     TEXT,
        tool_calls_json TEXT,
        finish_reason   TEXT,
        accepted        INTEGER,
        latency_ms      REAL,
        prompt_tokens   INTEGER,
        completion_tokens INTEGER,
        cached_tokens   INTEGER,
        temperature     REAL,
        model           TEXT,
        adapter         TEXT
    );
    CREATE INDEX turns_call ON turns(invocation_id, turn_index);
    CREATE TABLE feedback (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        invocation_id   TEXT NOT NULL,
        created_at      REAL NOT NULL,
        correct         INTEGER,
        score           REAL,
        corrected_output TEXT,
        note            TEXT
    );
    CREATE INDEX feedback_call ON feedback(invocation_id);
    """,
    # v2: the learning loop. Who answered (the served model or a teacher), the student's
    # shadow answer, and the adapter registry: immutable versions, a deployed pointer per
    # (task, base model) and a log of every promotion and rollback.
    """
    ALTER TABLE calls ADD COLUMN source TEXT;
    ALTER TABLE turns ADD COLUMN source TEXT;
    ALTER TABLE turns ADD COLUMN shadow_output TEXT;
    CREATE TABLE adapters (
        adapter_id      TEXT PRIMARY KEY,   -- <task_key>@v<version>
        task_key        TEXT NOT NULL,
        version         INTEGER NOT NULL,
        base            TEXT NOT NULL,      -- models.fingerprint of the base it was trained on
        status          TEXT NOT NULL,      -- training | failed | cancelled | rejected | passed
        created_at      REAL NOT NULL,
        finished_at     REAL,
        pid             INTEGER,
        path            TEXT,               -- directory: adapter.gguf, peft/, manifest.json, data.jsonl
        parent          TEXT,               -- the version deployed when training started
        config_json     TEXT,
        data_json       TEXT,
        metrics_json    TEXT,
        error           TEXT,
        UNIQUE (task_key, version)
    );
    CREATE TABLE deployments (
        task_key        TEXT NOT NULL,
        base            TEXT NOT NULL,
        adapter_id      TEXT,               -- NULL: the base model serves the task
        updated_at      REAL NOT NULL,
        PRIMARY KEY (task_key, base)
    );
    CREATE TABLE deploy_log (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        task_key        TEXT NOT NULL,
        base            TEXT NOT NULL,
        action          TEXT NOT NULL,      -- promote | rollback
        adapter_id      TEXT,
        previous        TEXT,
        created_at      REAL NOT NULL,
        note            TEXT
    );
    """,
    # v3: who holds a `training` reservation, so a dead or silent owner's can be reclaimed:
    # its host, its process's identity beyond the pid (boot id + start time: pids are
    # reused), and when the training process last said it is alive.
    """
    ALTER TABLE adapters ADD COLUMN owner_host TEXT;
    ALTER TABLE adapters ADD COLUMN owner_start TEXT;
    ALTER TABLE adapters ADD COLUMN heartbeat_at REAL;
    """,
    # v4: typed calls. Which attempt of the call a turn answers (byllm retries a call whose
    # answer it rejected), and whether the engine closed the value itself ("budget": the
    # token budget was running out; "loop": the output repeated one item), so a value that
    # is complete but truncated is never mistaken for the model's own.
    """
    ALTER TABLE turns ADD COLUMN attempt INTEGER DEFAULT 1;
    ALTER TABLE turns ADD COLUMN closed_by TEXT;
    """,
    # v5: scale-out. The adapter versions loaded into vLLM servers under which names. A row is
    # written before the server is asked ('loading': an intent, so a crash leaves a trace to
    # clean up), 'loaded' once the server lists the name; calls route to a name only while its
    # version is the task's deployed one (deployments stays the single source of truth).
    """
    CREATE TABLE remote_adapters (
        target          TEXT NOT NULL,      -- the server's base URL
        name            TEXT NOT NULL,      -- the model name requests use
        task_key        TEXT NOT NULL,
        adapter_id      TEXT NOT NULL,
        state           TEXT NOT NULL,      -- loading | loaded | unloaded | failed
        pid             INTEGER,            -- who is loading it
        retired_at      REAL,               -- traffic left it (unloaded once drained)
        updated_at      REAL NOT NULL,
        gate_json       TEXT,               -- the target gate's result
        error           TEXT,
        PRIMARY KEY (target, name)
    );
    CREATE INDEX remote_adapters_version ON remote_adapters(adapter_id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    """Per project: ./.mtllm_locally/calls.sqlite3, or $MTLLM_LOCALLY_STORE."""
    env = os.environ.get("MTLLM_LOCALLY_STORE")
    return Path(env) if env else Path.cwd() / ".mtllm_locally" / "calls.sqlite3"


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v, default=repr, ensure_ascii=False)


class Store:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._lock = threading.RLock()
        self.generation = 0  # commits through this connection (PRAGMA data_version ignores them)
        try:
            # The default directory (and one we create) is ours: 0700. A directory the
            # user named for the store is theirs; what we put in it is private.
            parent = self.path.parent
            private_dir(parent, tighten=parent.name == STORE_DIRNAME)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
            if self.path.is_file():  # SQLite gives -wal and -shm the database's mode: tighten it first
                make_private(self.path)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self.tighten()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open call store {self.path}: {e}") from e

    def tighten(self) -> None:
        """Make the store's own files private: the database and its -wal/-shm, and the
        adapters/ and logs/ trees beside it (a store made by an older version had them
        world-readable)."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.isfile(str(self.path) + suffix):
                make_private(str(self.path) + suffix)
        for sub in ("adapters", "logs"):
            make_private(self.path.parent / sub)

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise StoreError(f"call store {self.path} has schema v{version}, newer than this "
                                     f"mtllm_locally (v{SCHEMA_VERSION}); upgrade instead of downgrading")
                for v in range(version, SCHEMA_VERSION):
                    for stmt in MIGRATIONS[v].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (BEGIN IMMEDIATE: writers across processes queue here)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.generation += 1

    def data_version(self) -> tuple[int, int]:
        """Changes whenever anyone (this connection or another process) commits."""
        with self._lock:
            return self._db.execute("PRAGMA data_version").fetchone()[0], self.generation

    def schema_version(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    # ------------------------------------------------------------------ writes
    def record_turn(self, *, invocation_id: str, task_key: str, function: str | None, model: str,
                    messages: list, response_format: Any = None, tools: Any = None, output_text: str | None,
                    tool_calls: Any = None, finish_reason: str | None, latency_ms: float, prompt_tokens: int,
                    completion_tokens: int, cached_tokens: int = 0, temperature: float | None = None,
                    adapter: str | None = None, source: str = "model", shadow_output: str | None = None,
                    attempt: int = 1, closed_by: str | None = None) -> int:
        """Returns the turn's index within its call. `source`: who produced the output
        ("model", or "teacher:<model>" in distillation); `shadow_output`: the served model's
        own answer when a teacher answered (or later: set_shadow_output); `attempt`: which
        answer to the call this is; `closed_by`: the engine closed the value."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO calls (invocation_id, task_key, function, created_at, model, adapter) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(invocation_id) DO NOTHING",
                (invocation_id, task_key, function, now, model, adapter))
            (n,) = db.execute("SELECT n_turns FROM calls WHERE invocation_id=?", (invocation_id,)).fetchone()
            db.execute(
                "INSERT INTO turns (invocation_id, turn_index, created_at, messages_json, response_format_json, "
                "tools_json, output_text, tool_calls_json, finish_reason, latency_ms, prompt_tokens, "
                "completion_tokens, cached_tokens, temperature, model, adapter, source, shadow_output, attempt, "
                "closed_by) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (invocation_id, n, now, _dumps(messages), _dumps(response_format), _dumps(tools), output_text,
                 _dumps(tool_calls), finish_reason, latency_ms, prompt_tokens, completion_tokens, cached_tokens,
                 temperature, model, adapter, source, shadow_output, attempt, closed_by))
            db.execute(
                "UPDATE calls SET n_turns=n_turns+1, output_text=?, latency_ms=COALESCE(latency_ms,0)+?, "
                "prompt_tokens=prompt_tokens+?, completion_tokens=completion_tokens+?, temperature=?, model=?, "
                "adapter=?, source=? WHERE invocation_id=?",
                (output_text if output_text is not None else _dumps(tool_calls), latency_ms, prompt_tokens,
                 completion_tokens, temperature, model, adapter, source, invocation_id))
        return n

    def last_call_at(self) -> float | None:
        """When the latest call of any task was recorded (None: none yet): how the
        training process tells a busy program from an idle or exited one."""
        rows = self.rows("SELECT created_at FROM turns ORDER BY id DESC LIMIT 1")  # the rowid: no scan
        return rows[0]["created_at"] if rows else None

    def set_shadow_output(self, invocation_id: str, turn_index: int, text: str) -> bool:
        """The student's shadow answer, stored into a turn a teacher answered once the
        student finished (the call did not wait for it). Never overwrites one; False when
        the turn has none to fill."""
        with self.transaction() as db:
            cur = db.execute("UPDATE turns SET shadow_output=? WHERE invocation_id=? AND turn_index=? "
                             "AND shadow_output IS NULL", (text, invocation_id, turn_index))
            return cur.rowcount == 1

    def finish_call(self, invocation_id: str, *, accepted: bool, inputs: Any = None, function: str | None = None,
                    error: str | None = None) -> None:
        """byllm's verdict: the last turn is accepted or not; earlier turns of a call
        that needed a retry were rejected."""
        with self.transaction() as db:
            db.execute(
                "UPDATE calls SET accepted=?, inputs_json=COALESCE(?, inputs_json), "
                "function=COALESCE(?, function), error=? WHERE invocation_id=?",
                (int(accepted), _dumps(inputs), function, error, invocation_id))
            last = db.execute("SELECT MAX(turn_index) FROM turns WHERE invocation_id=?",
                              (invocation_id,)).fetchone()[0]
            if last is not None:
                db.execute("UPDATE turns SET accepted=0 WHERE invocation_id=? AND turn_index<? "
                           "AND finish_reason!='tool_calls'", (invocation_id, last))
                db.execute("UPDATE turns SET accepted=? WHERE invocation_id=? AND turn_index=?",
                           (int(accepted), invocation_id, last))

    def add_feedback(self, invocation_id: str, *, correct: bool | None = None, score: float | None = None,
                     corrected_output: Any = None, note: str | None = None) -> None:
        if correct is None and score is None and corrected_output is None:
            raise ValueError("feedback needs correct=, score= or corrected_output=")
        text = corrected_output if isinstance(corrected_output, str) or corrected_output is None \
            else _dumps(corrected_output)
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM calls WHERE invocation_id=?", (invocation_id,)).fetchone():
                raise KeyError(f"no call with invocation id {invocation_id!r}")
            db.execute("INSERT INTO feedback (invocation_id, created_at, correct, score, corrected_output, note) "
                       "VALUES (?,?,?,?,?,?)",
                       (invocation_id, time.time(), None if correct is None else int(correct), score, text, note))

    # ------------------------------------------------------------------ reads
    def rows(self, query: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            cur = self._db.execute(query, args)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def tasks(self) -> list[dict]:
        """Per task: calls, accepted, corrected/confirmed by feedback, answered by a teacher."""
        return self.rows(
            "SELECT c.task_key, MAX(c.function) AS function, COUNT(*) AS calls, SUM(c.accepted=1) AS accepted, "
            "SUM(c.source LIKE 'teacher:%') AS teacher, MAX(c.created_at) AS last_call, "
            "SUM(EXISTS(SELECT 1 FROM feedback f WHERE f.invocation_id=c.invocation_id)) AS with_feedback "
            "FROM calls c GROUP BY c.task_key ORDER BY last_call DESC")

    def calls(self, task_key: str | None = None, limit: int = 1000) -> list[dict]:
        if task_key:
            return self.rows("SELECT * FROM calls WHERE task_key=? ORDER BY created_at LIMIT ?", (task_key, limit))
        return self.rows("SELECT * FROM calls ORDER BY created_at LIMIT ?", (limit,))

    def turns(self, invocation_id: str) -> list[dict]:
        return self.rows("SELECT * FROM turns WHERE invocation_id=? ORDER BY turn_index", (invocation_id,))

    def answers(self, invocation_id: str) -> int:
        """Final answers (turns that are not tool calls) already recorded for a call."""
        (row,) = self.rows("SELECT COUNT(*) AS n FROM turns WHERE invocation_id=? "
                           "AND COALESCE(finish_reason, '') != 'tool_calls'", (invocation_id,))
        return row["n"]

    def feedback(self, invocation_id: str) -> list[dict]:
        return self.rows("SELECT * FROM feedback WHERE invocation_id=? ORDER BY id", (invocation_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
