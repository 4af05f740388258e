"""``python -m humanref batch``: one workflow, many rows of inputs, spread over several ComfyUI servers.

Each row of a table (CSV or JSONL) is a list of ``NODE.INPUT`` overrides that mean exactly what ``run --set``
means (cli.run.parse_sets / apply_sets; image files uploaded with cli.run.Uploader, once per server). Prompts go
to whichever server has the shortest queue (GET /queue, POST /prompt); a scheduler loop follows them by polling
/queue and /history, which also tells it when a server stops answering: its rows go back to the others. Outputs
are saved per row (OUT/<row id>/) and every finished row is appended to OUT/manifest.jsonl, so a rerun with the
same --out skips the rows already done.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO

from .client import ComfyClient, ComfyError, Interrupted, PromptRejected, RunResult, history_failure
from .run import Progress, Uploader, UsageError, apply_sets, find_node, parse_sets, save_outputs, upload_from_dir

MANIFEST = "manifest.jsonl"
ID_COLUMN = "id"
SEED_INPUTS = ("seed", "noise_seed")
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_LOST = 3  # a row taken back from this many dying servers is failed (it may be what kills them)
BAR = 24


# ----------------------------------------------------------------------------------------------- the table
@dataclass
class Row:
    """One row of the table: its overrides, parsed as ``--set NODE.INPUT=VALUE`` would parse them."""

    number: int  # 1-based data row of the table
    id: str  # its folder under --out and its key in the manifest
    values: dict[str, Any]  # column -> the value as written (CSV text or JSON value); unset cells left out
    sets: list[tuple[str, str, Any]] = field(default_factory=list)


def _row_sets(values: dict[str, Any], where: str, csv_text: bool) -> list[tuple[str, str, Any]]:
    """A CSV cell is parsed as the VALUE of ``--set COLUMN=VALUE``; a JSONL value is already JSON and means
    ``--set KEY=<that JSON>`` (both go through cli.run.parse_sets: one meaning of a column)."""
    sets = []
    for column, value in values.items():
        text = value if csv_text else json.dumps(value)
        try:
            sets += parse_sets([f"{column}={text}"])
        except UsageError:
            raise UsageError(f"{where}: column {column!r} is not NODE.INPUT (e.g. 13.seed, KSampler.steps, "
                             f"'Reference: face.image'); name the row with an '{ID_COLUMN}' column and start a "
                             "column that is a note with '#'") from None
    return sets


def _is_setting(column: str) -> bool:
    return column != ID_COLUMN and not column.startswith("#")


def read_table(path: str) -> list[Row]:
    """Rows of a CSV (header line of column names) or JSONL (one JSON object per line) table.

    An empty CSV cell or a JSONL null leaves that input as the workflow has it. An ``id`` column names the rows
    (their output folders); without one, rows are numbered from 1 (0001, 0002, ...). Columns starting with '#'
    are notes and ignored.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the table {path}: {e.strerror}") from None
    name = os.path.basename(path)
    raw: list[tuple[int, dict[str, Any], Optional[Any]]] = []  # (number, values, id or None)
    if path.lower().endswith((".jsonl", ".ndjson")):
        number = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{name} line {lineno}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{name} line {lineno}: expected an object {{\"NODE.INPUT\": value, ...}}, "
                                 f"got {type(obj).__name__}")
            number += 1
            values = {k: v for k, v in obj.items() if _is_setting(k) and v is not None}
            raw.append((number, values, obj.get(ID_COLUMN)))
        rows = [Row(n, "", values, _row_sets(values, f"{name} line {n}", csv_text=False))
                for n, values, _ in raw]
    elif path.lower().endswith((".csv", ".tsv", ".txt")):
        dialect = "excel-tab" if path.lower().endswith(".tsv") else "excel"
        reader = csv.reader(text.splitlines(), dialect=dialect)
        header = next(reader, None)
        if not header:
            raise UsageError(f"{name} is empty: expected a header line of NODE.INPUT column names")
        header = [h.strip() for h in header]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise UsageError(f"{name}: column {dupes[0]!r} appears more than once")
        rows = []
        for number, cells in enumerate((c for c in reader if any(x.strip() for x in c)), 1):
            if len(cells) > len(header):
                raise UsageError(f"{name} row {number}: {len(cells)} cells but the header names {len(header)} "
                                 "columns")
            cells = cells + [""] * (len(header) - len(cells))
            values = {h: c for h, c in zip(header, cells) if _is_setting(h) and c != ""}
            raw.append((number, values, cells[header.index(ID_COLUMN)] if ID_COLUMN in header else None))
            rows.append(Row(number, "", values, _row_sets(values, f"{name} row {number}", csv_text=True)))
    else:
        raise UsageError(f"--table {path}: expected a .csv, .tsv or .jsonl file")
    if not rows:
        raise UsageError(f"{name} has no rows")
    has_ids = any(row_id is not None for _, _, row_id in raw)
    width = max(4, len(str(len(rows))))
    seen: dict[str, int] = {}
    for row, (_, _, row_id) in zip(rows, raw):
        if has_ids:
            row.id = str(row_id).strip() if row_id is not None else ""
            if not SAFE_ID.fullmatch(row.id):
                raise UsageError(f"{name} row {row.number}: id {row.id!r} is not a usable folder name (letters, "
                                 "digits, '.', '_' and '-', starting with a letter or digit, at most 100)")
            if row.id in seen:
                raise UsageError(f"{name}: rows {seen[row.id]} and {row.number} have the same id {row.id!r}")
            seen[row.id] = row.number
        else:
            row.id = f"{row.number:0{width}d}"
    return rows


def resolve_row_paths(rows: list[Row], table_dir: str, prompt: dict, uploader: Uploader) -> None:
    """A relative file path given to an image input is taken relative to the table's folder (where a table's
    images usually sit); when no such file is there it stays as written, which apply_sets then reads
    relative to the current folder, as ``--set`` does."""
    for row in rows:
        for i, (ref, name, value) in enumerate(row.sets):
            if not isinstance(value, str) or not value or os.path.isabs(value):
                continue
            candidate = os.path.join(table_dir, value)
            if not os.path.isfile(candidate):
                continue
            nid = find_node(prompt, ref)
            if name in uploader.image_inputs(prompt[nid].get("class_type", "")):
                row.sets[i] = (ref, name, os.path.abspath(candidate))


class _NoUpload(Uploader):
    """Checks --set and row columns against the server's node declarations without uploading anything."""

    def upload(self, path: str) -> str:
        return os.path.basename(path)


def check_rows(prompt: dict, global_sets: list, rows: list[Row], uploader: Uploader, table: str) -> None:
    """Every column names a real node and input before anything is queued (the message names the row)."""
    checker = _NoUpload(uploader.client, uploader.log)
    checker._info, checker._types = uploader._info, uploader._types  # share what the server was asked
    apply_sets(json.loads(json.dumps(prompt)), global_sets, checker)
    checked: set[tuple[str, str]] = set()
    for row in rows:
        new = [s for s in row.sets if (s[0], s[1]) not in checked]
        if not new:
            continue
        try:
            apply_sets(json.loads(json.dumps(prompt)), new, checker)
        except UsageError as e:
            text = str(e).replace("--set ", "column ", 1)
            raise UsageError(f"{os.path.basename(table)} row {row.number}: {text}") from None
        checked.update((s[0], s[1]) for s in new)


# ----------------------------------------------------------------------------------------------- manifest
def fingerprint(workflow: Any, global_sets: list, inputs: Optional[str], row: Row) -> str:
    """What makes a row's result: the workflow file, --inputs, --set and the row's values. A done row whose
    fingerprint changed is run again."""
    blob = json.dumps({"workflow": workflow, "inputs": inputs, "sets": global_sets, "row": row.values},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(out: str, log: Optional[TextIO] = None) -> dict[str, dict]:
    """The last entry of each row id in OUT/manifest.jsonl (a line cut short by a crash is skipped)."""
    path = os.path.join(out, MANIFEST)
    entries: dict[str, dict] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return entries
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[str(entry["id"])] = entry
        except (ValueError, KeyError, TypeError):
            if log is not None:
                print(f"warning: {path} line {lineno} is not a manifest entry (cut short?): ignored", file=log)
    return entries


def is_done(entry: Optional[dict], print_: str, out: str) -> bool:
    return (entry is not None and entry.get("status") == "done" and entry.get("fingerprint") == print_
            and all(os.path.isfile(os.path.join(out, p)) for p in entry.get("files") or []))


def append_manifest(out: str, entry: dict) -> None:
    """One JSON line per finished row, flushed to disk before the next row counts as done."""
    with open(os.path.join(out, MANIFEST), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def prompt_seeds(prompt: dict) -> Any:
    """The seed the row ran with: one value when every seed input of the prompt agrees, else {node id: seed}."""
    seeds = {nid: node["inputs"][name] for nid, node in prompt.items() for name in SEED_INPUTS
             if isinstance((node.get("inputs") or {}).get(name), int)}
    distinct = set(seeds.values())
    if not seeds:
        return None
    return distinct.pop() if len(distinct) == 1 else seeds


def history_error(entry: dict) -> tuple[Optional[str], bool]:
    """(error text or None, interrupted) of a finished /history entry, read as ComfyClient.run reads it."""
    failure = history_failure(entry)
    return (None, False) if failure is None else (str(failure), isinstance(failure, Interrupted))


def execution_seconds(entry: dict) -> Optional[float]:
    """Seconds from execution_start to the end message in /history (the server's own timestamps, in ms)."""
    stamps = {kind: (data or {}).get("timestamp") for kind, data in (entry.get("status") or {}).get("messages")
              or []}
    start = stamps.get("execution_start")
    end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
    return round((end - start) / 1000.0, 3) if isinstance(start, (int, float)) and isinstance(end, (int, float)) \
        else None


# ----------------------------------------------------------------------------------------------- scheduling
@dataclass
class Task:
    row: Row
    fingerprint: str
    attempts: list[dict] = field(default_factory=list)  # earlier tries: server, prompt id, what happened
    failures: int = 0  # failed on a server (rejected, node error, timeout)
    lost: int = 0  # taken back from a server that stopped answering
    failed_on: set = field(default_factory=set)


@dataclass
class Flight:
    task: Task
    prompt_id: str
    prompt: dict
    queued: float
    started: Optional[float] = None  # first seen running
    missing: int = 0  # polls in which it was neither queued nor in /history


@dataclass
class Server:
    name: str  # s1, s2, ... in the progress line
    url: str
    client: ComfyClient
    uploader: Uploader
    process: Any = None  # a LocalComfyUI this command started (its death is seen at once)
    up: bool = True
    gone: bool = False  # its process ended: never asked again
    queue_len: int = 0  # prompts queued or running on it, anyone's (from /queue)
    errors: int = 0  # failed polls in a row
    next_probe: float = 0.0
    inflight: dict = field(default_factory=dict)  # prompt id -> Flight
    abandoned: set = field(default_factory=set)  # prompt ids taken back: cancelled if it answers again
    dispatched: int = 0
    done: int = 0
    failed: int = 0
    taken_back: int = 0


@dataclass
class Summary:
    total: int
    skipped: int = 0
    done: int = 0
    failed: list = field(default_factory=list)  # (row id, error)
    not_run: list = field(default_factory=list)  # row ids
    reassigned: int = 0
    files: list = field(default_factory=list)
    seconds: float = 0.0


class _Notes(io.TextIOBase):
    """A text stream whose lines become progress notes (the uploaders' messages print above the bar)."""

    def __init__(self, note: Callable[[str], None]):
        self.note = note
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.note(line)
        return len(text)


class BatchProgress:
    """One bar over all rows with per-server counts (the runner's Progress line: rewritten on a terminal, one
    line per change otherwise), plus notes printed above it."""

    def __init__(self, total: int, stream: TextIO):
        self.total = total
        self.stream = stream
        self.line = Progress({}, stream)

    def note(self, text: str) -> None:
        if self.line.tty and self.line.last:
            self.stream.write("\r\x1b[2K")
        print(text, file=self.stream, flush=True)
        if self.line.tty and self.line.last:
            last, self.line.last = self.line.last, ""
            self.line.show(last)

    def update(self, finished: int, failed: int, servers: list[Server]) -> None:
        filled = int(BAR * finished / self.total) if self.total else BAR
        parts = []
        for s in servers:
            state = "" if s.up else " (gone)" if s.gone else " (down)"
            text = f"{s.name} {s.done} done"
            if s.inflight and self.line.tty:  # elsewhere a line per change: one per row is enough
                text += f" {len(s.inflight)} queued"
            if s.taken_back:
                text += f" {s.taken_back} taken back"
            parts.append(text + state)
        failed_text = f" ({failed} failed)" if failed else ""
        self.line.show(f"[{'#' * filled}{'.' * (BAR - filled)}] {finished}/{self.total} rows{failed_text} | "
                       + " | ".join(parts))

    def close(self) -> None:
        self.line.close()


class Batch:
    """The scheduler: dispatch to the shortest queue, follow by polling, reassign what a lost server held."""

    def __init__(self, servers: list[Server], prompt: dict, tasks: list[Task], out: str,
                 global_sets: list, inputs: Optional[str], extra_data: Optional[dict] = None,
                 timeout: float = 900.0, depth: int = 2, retries: int = 0, poll: float = 0.25,
                 server_wait: float = 60.0, probe: float = 5.0, log: TextIO = sys.stderr,
                 on_file: Callable[[str], None] = lambda path: None, include_temp: bool = False,
                 skipped: int = 0):
        self.servers = servers
        self.prompt = prompt
        self.pending: deque[Task] = deque(tasks)
        self.out = out
        self.global_sets = global_sets
        self.inputs = inputs
        self.extra_data = extra_data
        self.timeout = timeout
        self.depth = max(1, depth)
        self.retries = retries
        self.poll = poll
        self.server_wait = server_wait
        self.probe = probe
        self.log = log
        self.on_file = on_file
        self.include_temp = include_temp
        self.summary = Summary(total=len(tasks) + skipped, skipped=skipped)
        self.progress = BatchProgress(self.summary.total, log)
        for s in servers:
            s.uploader.log = _Notes(self.progress.note)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Summary:
        start = time.monotonic()
        no_server_since: Optional[float] = None
        try:
            while self.pending or any(s.inflight for s in self.servers):
                for s in self.servers:
                    if s.up:
                        self._poll(s)
                    elif not s.gone and time.monotonic() >= s.next_probe:
                        self._probe(s)
                self._dispatch()
                self._show()
                if self.pending and not any(s.up for s in self.servers):
                    now = time.monotonic()
                    no_server_since = no_server_since or now
                    if all(s.gone for s in self.servers) or now - no_server_since > self.server_wait:
                        self.progress.note("error: no server answers"
                                           + ("" if all(s.gone for s in self.servers)
                                              else f" (waited {self.server_wait:.0f} s)")
                                           + f": {len(self.pending)} row(s) not run")
                        self.summary.not_run += [t.row.id for t in self.pending]
                        self.pending.clear()
                        break
                else:
                    no_server_since = None
                time.sleep(self.poll)
        except KeyboardInterrupt:
            for s in self.servers:
                for pid in list(s.inflight):
                    if s.up:
                        s.client.cancel(pid)
                self.summary.not_run += [f.task.row.id for f in s.inflight.values()]
                s.inflight.clear()
            self.summary.not_run += [t.row.id for t in self.pending]
            self.pending.clear()
            raise
        finally:
            self.summary.seconds = time.monotonic() - start
            self._show()
            self.progress.close()
        return self.summary

    def _show(self) -> None:
        finished = self.summary.skipped + self.summary.done + len(self.summary.failed)
        self.progress.update(finished, len(self.summary.failed), self.servers)

    # ------------------------------------------------------------------ dispatch
    def _choose(self, task: Task) -> Optional[Server]:
        free = [s for s in self.servers if s.up and s.queue_len < self.depth]
        fresh = [s for s in free if s.url not in task.failed_on]
        pool = fresh or free
        if not pool:
            return None
        return min(pool, key=lambda s: (s.queue_len, len(s.inflight), s.dispatched, self.servers.index(s)))

    def _dispatch(self) -> None:
        while self.pending:
            task = self.pending[0]
            server = self._choose(task)
            if server is None:
                return
            self.pending.popleft()
            self._submit(server, task)

    def _build(self, server: Server, task: Task) -> dict:
        """The row's prompt for this server: --inputs, then --set, then the row's columns (uploads to it)."""
        prompt = json.loads(json.dumps(self.prompt))
        if self.inputs:
            upload_from_dir(prompt, self.inputs, server.uploader)
        apply_sets(prompt, self.global_sets, server.uploader)
        apply_sets(prompt, task.row.sets, server.uploader)
        return prompt

    def _submit(self, server: Server, task: Task) -> None:
        try:
            prompt = self._build(server, task)
            prompt_id = server.client.queue_prompt(prompt, self.extra_data)
        except PromptRejected as e:
            self._row_failed(server, task, None, str(e))
            return
        except (UsageError, ComfyError) as e:
            if isinstance(e, ComfyError) and not self._answers(server):
                self.pending.appendleft(task)
                self._lose(server, str(e))
                return
            self._row_failed(server, task, None, str(e))
            return
        server.dispatched += 1
        server.queue_len += 1
        server.inflight[prompt_id] = Flight(task, prompt_id, prompt, time.monotonic())

    # ------------------------------------------------------------------ following
    def _answers(self, server: Server) -> bool:
        if server.process is not None and not server.process.alive():
            return False
        try:
            server.client.get_json("/queue", timeout=5)
            return True
        except ComfyError:
            return False

    def _poll(self, s: Server) -> None:
        if s.process is not None and not s.process.alive():
            code = s.process.proc.returncode if s.process.proc is not None else None
            s.gone = True
            self._lose(s, f"its process ended (exit status {code})")
            return
        try:
            queue = s.client.get_json("/queue", timeout=10)
        except (ComfyError, ValueError) as e:
            s.errors += 1
            if s.errors >= 2:
                self._lose(s, str(e))
            return
        s.errors = 0
        running = {item[1] for item in queue.get("queue_running") or [] if len(item) > 1}
        waiting = {item[1] for item in queue.get("queue_pending") or [] if len(item) > 1}
        s.queue_len = len(running | waiting)
        now = time.monotonic()
        for pid, flight in list(s.inflight.items()):
            if pid in running or pid in waiting:  # /queue first, then /history: no gap between the two
                flight.missing = 0
                if pid in running and flight.started is None:
                    flight.started = now
                if flight.started is not None and now - flight.started > self.timeout:
                    s.client.cancel(pid)
                    del s.inflight[pid]
                    self._row_failed(s, flight.task, flight, f"timed out after {self.timeout:.0f} s on {s.url}")
                continue
            try:
                entry = s.client.history(pid)
            except (ComfyError, ValueError) as e:
                s.errors += 1
                self._lose(s, str(e))
                return
            status = entry.get("status")
            if isinstance(status, dict) and (status.get("completed") or status.get("status_str")):
                del s.inflight[pid]
                self._finish(s, flight, entry)
                if not s.up:
                    return
            else:
                flight.missing += 1
                if flight.missing >= 3:  # the server forgot it (restarted, queue cleared)
                    del s.inflight[pid]
                    self._take_back(s, flight, "the prompt vanished from the server's queue and history")

    def _probe(self, s: Server) -> None:
        s.next_probe = time.monotonic() + self.probe
        if s.process is not None and not s.process.alive():
            s.gone = True
            return
        try:
            s.client.get_json("/queue", timeout=3)
        except (ComfyError, ValueError):
            return
        s.up, s.errors = True, 0
        for pid in s.abandoned:  # it may still hold what we gave to others: do not let it run twice
            s.client.cancel(pid)
        s.abandoned.clear()
        self.progress.note(f"{s.name} ({s.url}) answers again")

    def _lose(self, s: Server, reason: str) -> None:
        s.up = False
        s.next_probe = time.monotonic() + self.probe
        flights = list(s.inflight.values())
        s.inflight.clear()
        for flight in flights:
            self._take_back(s, flight, f"server lost: {reason}")
        self.progress.note(f"{s.name} ({s.url}) is lost: {reason}"
                           + (f"; its {len(flights)} row(s) go to the other servers" if flights else ""))

    def _take_back(self, s: Server, flight: Flight, why: str) -> None:
        task = flight.task
        task.attempts.append({"server": s.url, "prompt_id": flight.prompt_id, "outcome": why})
        task.lost += 1
        s.taken_back += 1
        s.abandoned.add(flight.prompt_id)
        self.summary.reassigned += 1
        if task.lost >= MAX_LOST:
            self._final(s, task, flight, f"lost with its server {task.lost} times (does this row crash the "
                                          f"server?): {why}")
        else:
            self.pending.appendleft(task)

    # ------------------------------------------------------------------ results
    def _row_failed(self, s: Server, task: Task, flight: Optional[Flight], error: str) -> None:
        task.failures += 1
        task.failed_on.add(s.url)
        if task.failures <= self.retries:
            task.attempts.append({"server": s.url, "prompt_id": flight.prompt_id if flight else None,
                                  "outcome": error})
            self.progress.note(f"row {task.row.id} failed on {s.name}, trying again: {error.splitlines()[0]}")
            self.pending.append(task)
            return
        self._final(s, task, flight, error)

    def _final(self, s: Server, task: Task, flight: Optional[Flight], error: str) -> None:
        s.failed += 1
        self.summary.failed.append((task.row.id, error))
        self.progress.note(f"row {task.row.id} failed on {s.name}: {error}")
        append_manifest(self.out, self._entry(s, task, flight, "failed", error=error))

    def _finish(self, s: Server, flight: Flight, entry: dict) -> None:
        task = flight.task
        error, interrupted = history_error(entry)
        if interrupted:
            self._take_back(s, flight, error or "interrupted")
            return
        if error:
            self._row_failed(s, task, flight, error)
            return
        result = RunResult(flight.prompt_id, entry, entry.get("outputs") or {})
        row_dir = os.path.join(self.out, task.row.id)
        if os.path.isdir(row_dir):  # left by an attempt that did not finish: this row is redone whole
            shutil.rmtree(row_dir)
        try:
            saved = save_outputs(s.client, result, row_dir, include_temp=self.include_temp)
        except ComfyError as e:
            if not self._answers(s):
                s.inflight[flight.prompt_id] = flight  # taken back with the rest
                self._lose(s, str(e))
            else:
                self._row_failed(s, task, flight, f"cannot fetch its outputs: {e}")
            return
        warnings = [f"node {nid} ({(flight.prompt.get(nid) or {}).get('class_type', '?')}): {w}"
                    for nid, w in result.warnings()]
        for w in warnings:
            self.progress.note(f"row {task.row.id}: warning: {w}")
        files = [os.path.relpath(p, self.out) for p in saved]
        s.done += 1
        self.summary.done += 1
        self.summary.files += saved
        append_manifest(self.out, self._entry(s, task, flight, "done", files=files, warnings=warnings,
                                              seconds=execution_seconds(entry)))
        for path in saved:
            self.on_file(path)

    def _entry(self, s: Server, task: Task, flight: Optional[Flight], status: str, files: Optional[list] = None,
               warnings: Optional[list] = None, error: Optional[str] = None,
               seconds: Optional[float] = None) -> dict:
        prompt = flight.prompt if flight is not None else None
        return {
            "row": task.row.number, "id": task.row.id, "status": status, "server": s.url,
            "seed": prompt_seeds(prompt) if prompt is not None else None,
            "files": files or [], "seconds": seconds,
            "wall_seconds": round(time.monotonic() - flight.queued, 3) if flight is not None else None,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "error": error, "warnings": warnings or [],
            "prompt_id": flight.prompt_id if flight is not None else None,
            "attempts": task.attempts, "values": task.row.values, "fingerprint": task.fingerprint,
        }


# ----------------------------------------------------------------------------------------------- servers
def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalServers:
    """N private ComfyUI servers (cli.server.LocalComfyUI) started side by side; on a machine with GPUs one per
    device (--cuda-device i), on a CPU machine all on the CPU. A context manager: every server is stopped at the
    end, whatever happened.

    Each server is started from its own thread, and that thread stays parked until stop(): LocalComfyUI asks
    Linux to end the server when the thread that started it ends (PR_SET_PDEATHSIG follows the thread, not the
    process), which is what keeps a server from outliving a killed runner.
    """

    def __init__(self, comfyui: str, workers: Optional[int], models: Optional[str], cpu: Optional[bool],
                 extra_args: list[str], start_timeout: float, logs: Optional[str]):
        from .server import LocalComfyUI, needs_cpu_flag

        on_cpu = needs_cpu_flag() if cpu is None else cpu
        self.gpus = 0 if on_cpu else gpu_count()
        n = workers or max(1, self.gpus)
        self.servers = []
        for i in range(n):
            args = list(extra_args) + (["--cuda-device", str(i % self.gpus)] if self.gpus else [])
            self.servers.append(LocalComfyUI(comfyui, models=models, cpu=cpu, extra_args=args,
                                             start_timeout=start_timeout,
                                             log_path=os.path.join(logs, f"s{i + 1}.log") if logs else None))
        self.logs = logs
        self.errors: list[Optional[BaseException]] = [None] * n
        self._release = threading.Event()
        self._threads: list[threading.Thread] = []

    def _serve(self, i: int, ready: threading.Event) -> None:
        try:
            self.servers[i].start()
        except BaseException as e:  # noqa: BLE001 - reported by start() for each server
            self.errors[i] = e
        ready.set()
        self._release.wait()

    def start(self, log: TextIO) -> list:
        """Start them all and wait; returns those that came up (the others are reported on ``log``)."""
        n = len(self.servers)
        if self.gpus and n > self.gpus:
            print(f"warning: {n} workers on {self.gpus} GPU(s): some GPUs hold more than one server", file=log)
        if self.logs:
            os.makedirs(self.logs, exist_ok=True)
        where = f"{self.gpus} GPU(s)" if self.gpus else "the CPU"
        print(f"starting {n} ComfyUI server(s) from {self.servers[0].comfyui} on {where} ...", file=log, flush=True)
        events = [threading.Event() for _ in range(n)]
        for i in range(n):
            thread = threading.Thread(target=self._serve, args=(i, events[i]), daemon=True,
                                      name=f"humanref-server-s{i + 1}")
            thread.start()
            self._threads.append(thread)
        for event in events:
            while not event.wait(0.5):
                pass
        started = []
        for server, error in zip(self.servers, self.errors):
            if error is not None:
                print(f"error: a local server did not start: {error}", file=log)
            else:
                started.append(server)
        return started

    def stop(self) -> None:
        for server in self.servers:
            try:
                server.stop()
            except KeyboardInterrupt:
                server.stop()
        self._release.set()


# ----------------------------------------------------------------------------------------------- command
def plan(rows: list[Row], prints: list[str], out: str, log: TextIO) -> tuple[list[Task], int]:
    """(tasks to run, rows skipped as done) against the manifest of an earlier run into the same --out."""
    done = read_manifest(out, log)
    tasks, skipped, changed = [], 0, 0
    for row, print_ in zip(rows, prints):
        entry = done.get(row.id)
        if is_done(entry, print_, out):
            skipped += 1
            continue
        if entry is not None and entry.get("status") == "done":
            changed += 1
        tasks.append(Task(row, print_))
    if changed:
        print(f"{changed} row(s) done before are run again: their values, the workflow, --set or --inputs "
              "changed, or their files are gone", file=log)
    return tasks, skipped


def cmd_batch(args: Any) -> int:
    """The ``batch`` subcommand (arguments from cli.build_parser); returns the exit status."""
    import shlex

    from .common import DEFAULT_SERVER, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, pack_copy_note
    from .convert import ConversionError
    from .run import load_workflow, to_api
    from .server import ServerError

    err = sys.stderr
    local: list = []
    pool: Optional[LocalServers] = None
    try:
        workflow = load_workflow(args.workflow)
        global_sets = parse_sets(args.set)
        rows = read_table(args.table)
        if args.inputs and not os.path.isdir(args.inputs):
            raise UsageError(f"--inputs {args.inputs} is not a directory")
        if args.workers is not None and args.workers < 1:
            raise UsageError("--workers must be at least 1")
        if args.workers is not None and not args.comfyui:
            raise UsageError("--workers starts local servers: give --comfyui PATH too")
        if args.depth < 1:
            raise UsageError("--depth must be at least 1")
        urls = list(args.server or [])
        if not urls and not args.comfyui:
            urls = [DEFAULT_SERVER]
        out = os.path.abspath(args.out)
        inputs = os.path.abspath(args.inputs) if args.inputs else None
        prints = [fingerprint(workflow, global_sets, inputs, row) for row in rows]
        if os.path.isfile(out):
            raise UsageError(f"--out {args.out} is a file")
        tasks, skipped = plan(rows, prints, out, err)
        if not tasks:
            print(f"all {len(rows)} rows are already done in {args.out} (manifest {MANIFEST}): nothing to run",
                  file=err)
            return EXIT_OK
        if skipped:
            print(f"{skipped} of {len(rows)} rows already done in {args.out}: skipped", file=err)

        if args.comfyui:
            try:
                extra = shlex.split(args.comfyui_args)
            except ValueError as e:
                raise UsageError(f"--comfyui-args: {e}") from None
            pool = LocalServers(args.comfyui, args.workers, args.models, args.cpu, extra, args.start_timeout,
                                args.server_logs)
            local = pool.start(err)
            if local:
                print(pack_copy_note(local[0]), file=err)
            for i, server in enumerate(local, len(urls) + 1):
                print(f"s{i}: ComfyUI is up at {server.url} (pid {server.proc.pid}, temporary folder {server.tmp})",
                      file=err, flush=True)
        elif args.models:
            print("warning: --models is only used with --comfyui (a running server has its own model paths)",
                  file=err)
        servers: list[Server] = []
        for i, url in enumerate(urls + [s.url for s in local], 1):
            client = ComfyClient(url, timeout=args.request_timeout)
            process = local[i - len(urls) - 1] if i > len(urls) else None
            servers.append(Server(f"s{i}", client.url, client, Uploader(client, err), process))
            if process is None:
                print(f"s{i}: {client.url}", file=err)
        first = None
        for s in servers:
            try:
                s.client.get_json("/queue", timeout=10)
                first = first or s
            except ComfyError as e:
                s.up = False
                print(f"warning: {s.name}: {e}: it gets rows when it answers", file=err)
        if first is None:
            print("error: no server answers: start ComfyUI first, give each address with --server URL, or let "
                  "this command start local ones: --comfyui /path/to/ComfyUI --workers N", file=err)
            return EXIT_FAILED

        prompt, ui = to_api(workflow, first.client, err)
        check_rows(prompt, global_sets, rows, first.uploader, args.table)
        resolve_row_paths(rows, os.path.dirname(os.path.abspath(args.table)), prompt, first.uploader)
        os.makedirs(out, exist_ok=True)
        extra_data = {"extra_pnginfo": {"workflow": ui}} if ui is not None else None
        batch = Batch(servers, prompt, tasks, out, global_sets, args.inputs, extra_data, timeout=args.timeout,
                      depth=args.depth, retries=args.retries, server_wait=args.server_wait, log=err,
                      on_file=lambda path: print(path, flush=True), include_temp=args.save_temp, skipped=skipped)
        summary = batch.run()
        report(summary, servers, args.out, err)
        return EXIT_OK if not summary.failed and not summary.not_run else EXIT_FAILED
    except (UsageError, ConversionError) as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    except (ComfyError, ServerError) as e:
        print(f"error: {e}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\ninterrupted: the rows done so far are in {args.out}/{MANIFEST}; run the same command again to "
              "do the rest", file=err)
        return EXIT_INTERRUPTED
    finally:
        if pool is not None:
            pool.stop()


def report(summary: Summary, servers: list[Server], out: str, log: TextIO) -> None:
    per_server = ", ".join(f"{s.name} {s.done}" for s in servers)
    text = (f"{summary.done + summary.skipped}/{summary.total} rows done in "
            f"{summary.seconds:.1f} s ({per_server}")
    if summary.skipped:
        text += f"; {summary.skipped} done before"
    text += ")"
    if summary.reassigned:
        text += f"; {summary.reassigned} row(s) reassigned from a lost server"
    print(text, file=log)
    for row_id, error in summary.failed:
        print(f"failed: row {row_id}: {error}", file=log)
    if summary.not_run:
        print(f"not run: {len(summary.not_run)} row(s) ({', '.join(summary.not_run[:10])}"
              f"{', ...' if len(summary.not_run) > 10 else ''}): run the same command again", file=log)
    print(f"manifest: {os.path.join(out, MANIFEST)}", file=log)
