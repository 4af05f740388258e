"""The batch runner without a server: the table (a column means what --set means), the manifest and reruns, and
the scheduler against simulated ComfyUI servers (shortest queue, lost servers, bad rows, vanished prompts).

The simulated server keeps ComfyUI's contract that the scheduler relies on: POST /prompt validates and queues (or
answers 400), a prompt is in /queue until it is in /history, one prompt runs at a time; here one prompt finishes
each time /queue is read, so every run is deterministic.
"""
from __future__ import annotations

import copy
import io
import json
import os
import re
from pathlib import Path

import pytest

from humanref.cli.batch import (
    MAX_LOST,
    Batch,
    Row,
    Server,
    Task,
    append_manifest,
    execution_seconds,
    fingerprint,
    history_error,
    plan,
    prompt_seeds,
    read_manifest,
    read_table,
    resolve_row_paths,
)
from humanref.cli.client import ComfyError, PromptRejected
from humanref.cli.run import Uploader, UsageError, apply_sets, parse_sets

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- the table
def test_a_csv_cell_means_what_set_means(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text('13.seed,13.cfg,9.flag,10.text,8.link,# note,KSampler.steps\n'
                     '4,7.5,true,a man,"[""3"", 0]",anything,\n'
                     '5,,false,"x, y",null,,12\n')
    rows = read_table(str(table))
    assert [r.id for r in rows] == ["0001", "0002"] and [r.number for r in rows] == [1, 2]
    assert rows[0].values == {"13.seed": "4", "13.cfg": "7.5", "9.flag": "true", "10.text": "a man",
                              "8.link": '["3", 0]'}  # the empty cell and the note are left out
    assert rows[0].sets == [("13", "seed", 4), ("13", "cfg", 7.5), ("9", "flag", True), ("10", "text", "a man"),
                            ("8", "link", ["3", 0])]
    # the same strings given to --set: identical parses
    expected = parse_sets([f"{k}={v}" for k, v in rows[1].values.items()])
    assert rows[1].sets == expected == [("13", "seed", 5), ("9", "flag", False), ("10", "text", "x, y"),
                                        ("8", "link", None), ("KSampler", "steps", 12)]


def test_a_jsonl_value_is_taken_as_json(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"id": "anna", "13.seed": 4, "10.text": "4", "Reference: face.image": "a.png"}\n\n'
                     '{"id": 7, "13.seed": null, "8.link": ["3", 0]}\n')
    rows = read_table(str(table))
    assert [r.id for r in rows] == ["anna", "7"]
    assert rows[0].sets == [("13", "seed", 4), ("10", "text", "4"), ("Reference: face", "image", "a.png")]
    assert rows[1].values == {"8.link": ["3", 0]} and rows[1].sets == [("8", "link", ["3", 0])]


@pytest.mark.parametrize("name,text,message", [
    ("t.csv", "seed,13.steps\n1,2\n", "column 'seed' is not NODE.INPUT"),
    ("t.csv", "13.seed,13.seed\n1,2\n", "column '13.seed' appears more than once"),
    ("t.csv", "13.seed\n1,2\n", "row 1: 2 cells but the header names 1 columns"),
    ("t.csv", "id,13.seed\na,1\na,2\n", "rows 1 and 2 have the same id 'a'"),
    ("t.csv", "id,13.seed\n../x,1\n", "id '../x' is not a usable folder name"),
    ("t.csv", "id,13.seed\n,1\n", "id '' is not a usable folder name"),
    ("t.csv", "13.seed\n", "has no rows"),
    ("t.jsonl", '{"13.seed": 1}\n[1]\n', "line 2: expected an object"),
    ("t.jsonl", '{"13.seed": 1\n', "line 1: not JSON"),
    ("t.xlsx", "", "expected a .csv, .tsv or .jsonl file"),
])
def test_table_errors_name_the_row_or_column(tmp_path, name, text, message):
    table = tmp_path / name
    table.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_table(str(table))


def test_many_rows_are_numbered_wide_enough(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("13.seed\n" + "".join(f"{i}\n" for i in range(10001)))
    rows = read_table(str(table))
    assert rows[0].id == "00001" and rows[-1].id == "10001"


def test_the_readme_tables_name_real_nodes_and_inputs(tmp_path):
    """The README's table for each example workflow: every column resolves to a node and one of its inputs (the
    check run does before queueing), images are paths, seeds are numbers."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Batch\n"):text.index("\n## How it is built\n")]
    blocks = re.findall(r"`workflows/api/(\w+)\.json`(?:(?!```).)*?```csv\n(.*?)```", section, re.S)
    assert sorted(name for name, _ in blocks) == ["anydressing", "hands", "mimicbrush", "parts2whole", "references"]
    for name, body in blocks:
        table = tmp_path / f"{name}.csv"
        table.write_text(body)
        rows = read_table(str(table))
        assert len(rows) >= 2 and all(r.id != f"{r.number:04d}" for r in rows)  # named by the id column
        with open(REPO / "workflows" / "api" / f"{name}.json", encoding="utf-8") as f:
            workflow = json.load(f)
        for row in rows:
            prompt = copy.deepcopy(workflow)
            apply_sets(prompt, row.sets, None)
            for ref, input_name, value in row.sets:
                assert isinstance(value, int if input_name == "seed" else str), (name, ref, input_name, value)
                if input_name == "image":
                    assert value.endswith(".png")


class FakeUploader(Uploader):
    def __init__(self):
        super().__init__(None, io.StringIO())
        self._info = {"LoadImage": {}, "KSampler": {}}
        self._types = {"LoadImage": ["image"], "KSampler": []}


def test_relative_image_paths_are_looked_up_next_to_the_table(tmp_path, monkeypatch):
    (tmp_path / "table" / "img").mkdir(parents=True)
    (tmp_path / "table" / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prompt = {"2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
              "13": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    rows = [Row(1, "0001", {}, [("2", "image", "img/a.png"), ("13", "sampler_name", "img/a.png"),
                                ("2", "image", "img/missing.png")])]
    resolve_row_paths(rows, str(tmp_path / "table"), prompt, FakeUploader())
    assert rows[0].sets == [("2", "image", str(tmp_path / "table" / "img" / "a.png")),
                            ("13", "sampler_name", "img/a.png"),  # not an image input: the text is kept
                            ("2", "image", "img/missing.png")]  # not there: left for --set's own reading


# ----------------------------------------------------------------------------------------------- manifest
def test_a_rerun_skips_done_rows_whose_values_files_and_workflow_are_unchanged(tmp_path):
    rows = [Row(i, f"{i:04d}", {"13.seed": str(i)}, [("13", "seed", i)]) for i in (1, 2, 3, 4)]
    prints = [fingerprint({"wf": 1}, [], None, r) for r in rows]
    (tmp_path / "0001").mkdir()
    (tmp_path / "0001" / "a.png").write_bytes(b"x")
    (tmp_path / "0002").mkdir()
    append_manifest(str(tmp_path), {"id": "0001", "status": "done", "files": ["0001/a.png"],
                                    "fingerprint": prints[0]})
    append_manifest(str(tmp_path), {"id": "0002", "status": "done", "files": ["0002/gone.png"],
                                    "fingerprint": prints[1]})
    append_manifest(str(tmp_path), {"id": "0003", "status": "done", "files": [], "fingerprint": "other"})
    append_manifest(str(tmp_path), {"id": "0004", "status": "done", "files": [], "fingerprint": prints[3]})
    append_manifest(str(tmp_path), {"id": "0004", "status": "failed", "files": [], "fingerprint": prints[3]})
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"id": "0005", "sta')  # cut short by a crash
    log = io.StringIO()
    tasks, skipped = plan(rows, prints, str(tmp_path), log)
    # 0001 done; 0002 lost its file; 0003 changed; 0004's last entry failed
    assert skipped == 1 and [t.row.id for t in tasks] == ["0002", "0003", "0004"]
    assert "line 6 is not a manifest entry" in log.getvalue()
    assert "2 row(s) done before are run again" in log.getvalue()
    assert set(read_manifest(str(tmp_path))) == {"0001", "0002", "0003", "0004"}


def test_the_fingerprint_follows_every_input_of_the_row():
    row = Row(1, "0001", {"13.seed": "1"})
    base = fingerprint({"a": 1}, [("13", "steps", 4)], "in", row)
    assert base == fingerprint({"a": 1}, [("13", "steps", 4)], "in", Row(9, "0001", {"13.seed": "1"}))
    assert base != fingerprint({"a": 2}, [("13", "steps", 4)], "in", row)
    assert base != fingerprint({"a": 1}, [("13", "steps", 5)], "in", row)
    assert base != fingerprint({"a": 1}, [("13", "steps", 4)], "other", row)
    assert base != fingerprint({"a": 1}, [("13", "steps", 4)], "in", Row(1, "0001", {"13.seed": "2"}))


def test_seed_history_error_and_time_read_from_comfyui_structures():
    assert prompt_seeds({"3": {"inputs": {"seed": 7}}, "4": {"inputs": {"noise_seed": 7}}}) == 7
    assert prompt_seeds({"3": {"inputs": {"seed": 7}}, "4": {"inputs": {"noise_seed": 8}}}) == {"3": 7, "4": 8}
    assert prompt_seeds({"3": {"inputs": {"seed": ["5", 0]}}}) is None
    ok = {"status": {"status_str": "success", "completed": True, "messages": [
        ["execution_start", {"timestamp": 1000}], ["execution_cached", {"nodes": []}],
        ["execution_success", {"timestamp": 3500}]]}}
    assert history_error(ok) == (None, False) and execution_seconds(ok) == 2.5
    failed = {"status": {"status_str": "error", "messages": [["execution_start", {"timestamp": 0}], [
        "execution_error", {"node_id": "7", "node_type": "LoadImage", "exception_type": "OSError",
                            "exception_message": "bad file", "timestamp": 250}]]}}
    assert history_error(failed) == ("node 7 (LoadImage) failed: OSError: bad file", False)
    assert execution_seconds(failed) == 0.25
    stopped = {"status": {"status_str": "error", "messages": [
        ["execution_interrupted", {"node_id": "13", "node_type": "KSampler"}]]}}
    assert history_error(stopped) == ("interrupted on the server at node 13 (KSampler)", True)


# ----------------------------------------------------------------------------------------------- scheduler
class FakeComfy:
    """A simulated ComfyUI: one prompt finishes each time /queue is read (the contract, not the timing)."""

    def __init__(self, url: str, calls: list, foreign: int = 0):
        self.url = url
        self.calls = calls  # shared by all fakes: (url, row seed) in the order prompts were accepted
        self.queue: list[tuple[str, dict]] = [(f"foreign-{i}", {}) for i in range(foreign)]
        self.history_: dict[str, dict] = {}
        self.dead = False
        self.die_after: int | None = None  # accepted prompts, then it dies on the next /queue
        self.forget: set = set()  # seeds whose prompt the server drops (a restart losing its queue)
        self.accepted = 0
        self.cancelled: list[str] = []
        self.uploads: list[str] = []

    def _check(self):
        if self.dead:
            raise ComfyError(f"cannot reach ComfyUI at {self.url}: [Errno 111] Connection refused")

    def object_info(self, node_type=None):
        self._check()
        return {}

    def upload_image(self, path, subfolder="", overwrite=False):
        self._check()
        self.uploads.append(path)
        return os.path.basename(path)

    def queue_prompt(self, prompt, extra_data=None):
        self._check()
        seed = prompt["3"]["inputs"]["seed"]
        if seed < 0:
            raise PromptRejected({"error": {"message": "Prompt outputs failed validation"}, "node_errors": {
                "3": {"class_type": "KSampler", "errors": [{"message": "Value smaller than min",
                                                              "details": f"seed {seed} < 0"}]}}})
        pid = f"{self.url[-2:]}-{self.accepted}"
        self.accepted += 1
        self.calls.append((self.url, seed))
        self.queue.append((pid, prompt))
        return pid

    def _tick(self):
        if self.die_after is not None and self.accepted >= self.die_after:
            self.dead = True
        self._check()
        if not self.queue:
            return
        pid, prompt = self.queue.pop(0)
        if pid.startswith("foreign"):
            return
        seed = prompt["3"]["inputs"]["seed"]
        if seed in self.forget:
            self.forget.discard(seed)
            return
        if seed >= 1000:  # this row brings the server down
            self.dead = True
            self._check()
        if seed >= 500:  # a node fails on this row
            self.history_[pid] = {"status": {"status_str": "error", "completed": False, "messages": [
                ["execution_error", {"node_id": "3", "node_type": "KSampler", "exception_type": "ValueError",
                                     "exception_message": f"bad seed {seed}"}]]}, "outputs": {}}
            return
        self.history_[pid] = {"status": {"status_str": "success", "completed": True, "messages": []}, "outputs": {
            "9": {"images": [{"filename": f"img_{seed}.png", "subfolder": "HumanRef", "type": "output"}],
                  "humanref_warnings": [f"warned {seed}"] if seed == 3 else []}}}

    def get_json(self, path, timeout=None):
        assert path == "/queue"
        self._tick()
        items = [[i, pid, p, {}, []] for i, (pid, p) in enumerate(self.queue)]
        return {"queue_running": items[:1], "queue_pending": items[1:]}

    def history(self, prompt_id):
        self._check()
        return self.history_.get(prompt_id, {})

    def view(self, filename, subfolder="", type_="output"):
        self._check()
        return f"{self.url}/{subfolder}/{filename}".encode()

    def cancel(self, prompt_id):
        self.cancelled.append(prompt_id)


PROMPT = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
          "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2}},
          "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}}


def make(tmp_path, fakes, seeds, **options):
    servers = [Server(f"s{i}", f.url, f, Uploader(f, io.StringIO())) for i, f in enumerate(fakes, 1)]
    tasks = [Task(Row(i, f"{i:04d}", {"3.seed": s}, [("3", "seed", s)]), f"fp{i}") for i, s in enumerate(seeds, 1)]
    options.setdefault("poll", 0)
    options.setdefault("probe", 0)
    log = io.StringIO()
    batch = Batch(servers, PROMPT, tasks, str(tmp_path), [], None, log=log, **options)
    return batch, servers, log


def entries(tmp_path) -> list[dict]:
    with open(tmp_path / "manifest.jsonl") as f:
        return [json.loads(line) for line in f]


def check_done_once(tmp_path, seeds):
    """Every row done exactly once, with its own file, fetched from the server the manifest names."""
    found = entries(tmp_path)
    assert sorted(e["id"] for e in found) == [f"{i:04d}" for i in range(1, len(seeds) + 1)]
    for e in found:
        assert e["status"] == "done" and e["seed"] == seeds[e["row"] - 1]
        assert e["files"] == [f"{e['id']}/HumanRef/img_{e['seed']}.png"]
        assert (tmp_path / e["files"][0]).read_bytes() == f"{e['server']}/HumanRef/img_{e['seed']}.png".encode()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")) == sorted(
        f for e in found for f in e["files"])
    return found


def test_prompts_go_to_the_shortest_queue(tmp_path):
    calls: list = []
    busy, idle = FakeComfy("http://a:01", calls, foreign=3), FakeComfy("http://b:02", calls)
    batch, servers, _ = make(tmp_path, [busy, idle], list(range(8)), depth=2)
    summary = batch.run()
    # someone else's three prompts fill server a: the first two rows go to b, a gets rows once it has drained
    assert [url for url, _ in calls[:2]] == ["http://b:02", "http://b:02"]
    assert {url for url, _ in calls} == {"http://a:01", "http://b:02"}
    assert len(calls) == 8 and summary.done == 8 and not summary.failed and summary.reassigned == 0
    found = check_done_once(tmp_path, list(range(8)))
    assert {e["server"]: 0 for e in found}.keys() == {"http://a:01", "http://b:02"}
    assert servers[0].done + servers[1].done == 8
    warned = [e for e in found if e["seed"] == 3][0]
    assert warned["warnings"] == ["node 9 (SaveImage): warned 3"]


def test_a_lost_server_rows_go_to_the_others_exactly_once(tmp_path):
    calls: list = []
    dying, steady = FakeComfy("http://a:01", calls), FakeComfy("http://b:02", calls)
    dying.die_after = 3  # takes three rows, finishes at most two, then stops answering
    seeds = list(range(10))
    batch, servers, log = make(tmp_path, [dying, steady], seeds, depth=2)
    summary = batch.run()
    found = check_done_once(tmp_path, seeds)
    moved = [e for e in found if e["attempts"]]
    assert summary.reassigned == len(moved) >= 1
    for e in moved:
        assert e["server"] == "http://b:02"
        assert [a["server"] for a in e["attempts"]] == ["http://a:01"]
        assert e["attempts"][0]["outcome"].startswith("server lost: cannot reach ComfyUI at http://a:01")
    on_a = [e for e in found if e["server"] == "http://a:01"]
    assert len(on_a) + len(moved) == dying.accepted == 3
    assert servers[0].taken_back == len(moved) and not servers[0].up
    assert "s1 (http://a:01) is lost" in log.getvalue()


def test_a_server_that_answers_again_gets_rows_and_drops_what_went_elsewhere(tmp_path):
    calls: list = []
    flaky, steady = FakeComfy("http://a:01", calls), FakeComfy("http://b:02", calls)
    flaky.die_after = 1
    batch, servers, log = make(tmp_path, [flaky, steady], list(range(12)), depth=1)
    original = steady.get_json

    def revive(path, timeout=None):  # a comes back while b works through the rows
        if steady.accepted == 4:
            flaky.dead, flaky.die_after = False, None
        return original(path, timeout)

    steady.get_json = revive
    batch.run()
    found = check_done_once(tmp_path, list(range(12)))
    assert "s1 (http://a:01) answers again" in log.getvalue()
    assert flaky.cancelled == ["01-0"]  # the row it held went to b: it must not run it as well
    assert sum(e["server"] == "http://a:01" for e in found) >= 1


def test_bad_rows_are_reported_once_not_retried(tmp_path):
    calls: list = []
    fakes = [FakeComfy("http://a:01", calls), FakeComfy("http://b:02", calls)]
    seeds = [1, -1, 2, 600, 3]
    batch, _, log = make(tmp_path, fakes, seeds)
    summary = batch.run()
    assert sorted(summary.failed) == [("0002", "prompt rejected: Prompt outputs failed validation\n"
                                               "  node 3 (KSampler): Value smaller than min: seed -1 < 0"),
                                      ("0004", "node 3 (KSampler) failed: ValueError: bad seed 600")]
    assert sorted(s for _, s in calls) == [1, 2, 3, 600]  # the rejected row was never queued; 600 ran once
    by_id = {e["id"]: e for e in entries(tmp_path)}
    assert len(entries(tmp_path)) == 5
    assert by_id["0002"]["status"] == by_id["0004"]["status"] == "failed"
    assert by_id["0004"]["seed"] == 600 and by_id["0004"]["files"] == [] and by_id["0004"]["attempts"] == []
    assert [by_id[i]["status"] for i in ("0001", "0003", "0005")] == ["done"] * 3
    assert "row 0004 failed on s" in log.getvalue()


def test_retries_go_to_another_server_and_stop(tmp_path):
    calls: list = []
    fakes = [FakeComfy("http://a:01", calls), FakeComfy("http://b:02", calls)]
    batch, _, _ = make(tmp_path, fakes, [600], retries=1)
    summary = batch.run()
    assert len(summary.failed) == 1
    assert sorted(url for url, _ in calls) == ["http://a:01", "http://b:02"]  # once on each, then failed
    (entry,) = entries(tmp_path)
    assert entry["status"] == "failed" and len(entry["attempts"]) == 1
    assert entry["attempts"][0]["server"] != entry["server"]


def test_a_prompt_the_server_forgets_is_run_again(tmp_path):
    calls: list = []
    fake = FakeComfy("http://a:01", calls)
    fake.forget = {2}
    batch, _, _ = make(tmp_path, [fake], [1, 2, 3])
    summary = batch.run()
    found = check_done_once(tmp_path, [1, 2, 3])
    assert summary.reassigned == 1
    (again,) = [e for e in found if e["attempts"]]
    assert again["seed"] == 2 and "vanished" in again["attempts"][0]["outcome"]


def test_a_row_that_kills_every_server_is_failed_after_a_few(tmp_path):
    calls: list = []
    fakes = [FakeComfy(f"http://h:0{i}", calls) for i in range(1, MAX_LOST + 2)]
    seeds = [1, 1000, 2, 3, 4]
    batch, servers, _ = make(tmp_path, fakes, seeds, depth=1)
    summary = batch.run()
    assert [row for row, _ in summary.failed] == ["0002"]
    assert f"lost with its server {MAX_LOST} times" in summary.failed[0][1]
    by_id = {e["id"]: e for e in entries(tmp_path)}
    assert len(by_id["0002"]["attempts"]) == MAX_LOST
    assert sum(not s.up for s in servers) == MAX_LOST
    assert all(by_id[i]["status"] == "done" for i in ("0001", "0003", "0004", "0005"))


def test_with_no_server_left_the_rest_is_not_run(tmp_path):
    calls: list = []
    fake = FakeComfy("http://a:01", calls)
    fake.die_after = 1
    batch, _, log = make(tmp_path, [fake], [1, 2, 3], depth=1, server_wait=0)
    summary = batch.run()
    assert summary.done == 0 and sorted(summary.not_run) == ["0001", "0002", "0003"]
    assert not (tmp_path / "manifest.jsonl").exists()  # nothing finished: a rerun does them all
    assert "no server answers" in log.getvalue()


def test_the_choice_is_the_shortest_queue_below_the_depth(tmp_path):
    calls: list = []
    fakes = [FakeComfy(f"http://h:0{i}", calls) for i in range(1, 4)]
    batch, servers, _ = make(tmp_path, fakes, [1], depth=3)
    task = batch.pending[0]
    for server, queued in zip(servers, (2, 1, 3)):
        server.queue_len = queued
    assert batch._choose(task) is servers[1]
    servers[1].queue_len = 2  # a tie: fewer of our prompts, then fewer dispatched so far, then the order given
    servers[0].inflight = {"x": None}
    assert batch._choose(task) is servers[1]
    servers[1].inflight = {"y": None, "z": None}
    assert batch._choose(task) is servers[0]
    servers[0].up = False  # lost servers and full queues are never chosen
    servers[1].queue_len = 3
    assert batch._choose(task) is None
    servers[1].queue_len = 0
    task.failed_on.add(servers[1].url)  # a retry prefers a server it has not failed on, if one is free
    servers[2].queue_len = 2
    assert batch._choose(task) is servers[2]
    servers[2].queue_len = 3
    assert batch._choose(task) is servers[1]


def test_ctrl_c_cancels_our_prompts_and_leaves_the_manifest_whole(tmp_path):
    calls: list = []
    fake = FakeComfy("http://a:01", calls)
    batch, _, _ = make(tmp_path, [fake], [1, 2, 3, 4, 5, 6], depth=2)
    original, polls = fake.get_json, []

    def interrupted(path, timeout=None):
        polls.append(path)
        if len(polls) == 4:
            raise KeyboardInterrupt
        return original(path, timeout)

    fake.get_json = interrupted
    with pytest.raises(KeyboardInterrupt):
        batch.run()
    done = entries(tmp_path)
    assert [e["status"] for e in done] == ["done"] * len(done) and 1 <= len(done) < 6
    held = [pid for pid, _ in fake.queue]
    assert held and sorted(fake.cancelled) == sorted(held)  # what it still held is cancelled there
    assert sorted(batch.summary.not_run + [e["id"] for e in done]) == [f"{i:04d}" for i in range(1, 7)]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_notes_print_above_the_one_progress_line(tmp_path):
    from humanref.cli.batch import BatchProgress

    stream = Terminal()
    progress = BatchProgress(4, stream)
    server = Server("s1", "http://a:01", None, None)
    server.done, server.inflight = 1, {"p": None}
    progress.update(1, 0, [server])
    progress.note("row 0002 failed on s1: boom")
    progress.close()
    text = stream.getvalue()
    bar = "[######..................] 1/4 rows | s1 1 done 1 queued"
    # the bar, cleared for the note, the note on its own line, the bar drawn again, a newline at the end
    assert text.count(bar) == 2 and text.endswith(bar + "\n")
    assert "\r\x1b[2K\r\x1b[2K" not in text
    before, after = text.split("row 0002 failed on s1: boom\n")
    assert before.endswith(bar + "\r\x1b[2K") and after.startswith("\r\x1b[2K[")
