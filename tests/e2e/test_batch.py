"""`python -m humanref batch` on real ComfyUI servers with the pack and the tiny models.

Two local servers started by the command itself (--comfyui --workers 2), one of them killed (SIGKILL to its
process group) while it runs a row: every row must still complete exactly once (manifest and files), and a rerun
into the same --out must do nothing. On the session's server: bad rows are reported once and the others complete;
a rerun after fixing them runs those rows only.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from e2e_support import INPUTS, REPO, TINY_CKPT, comfyui_path, humanref_cli, reachable
from PIL import Image

WORKFLOW = REPO / "workflows" / "api" / "parts2whole.json"
# small but real: the tiny checkpoint and Parts2Whole release, a 64x96 image, three steps
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", "2.release=humanref-tiny-parts2whole",
         "--set", "12.width=64", "--set", "12.height=96", "--set", "13.steps=3"]
ROWS = 20


def pngs_under(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def prompt_of(png: Path) -> dict:
    """The prompt that made a PNG (SaveImage's metadata): what the server really ran for the row."""
    image = Image.open(png)
    image.load()
    assert image.size == (64, 96)
    return json.loads(image.info["prompt"])


def queue_running(url: str) -> list:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/queue", timeout=3) as r:
            return json.loads(r.read()).get("queue_running") or []
    except OSError:
        return []


def write_table(folder: Path, rows: int) -> Path:
    """jobs.csv: a seed per row and the face part given by a path relative to the table (uploaded), the node
    named by its title as --set allows."""
    (folder / "parts").mkdir(parents=True)
    shutil.copy(INPUTS / "face.png", folder / "parts" / "face.png")
    lines = ["13.seed,Part: face.image,# note"] + [f"{100 + i},parts/face.png,row {i + 1}" for i in range(rows)]
    table = folder / "jobs.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


@pytest.fixture(scope="module")
def killed_run(tiny_models, tmp_path_factory):
    """The 20-row batch on two local servers, the second killed while it runs a row: (out, table, stdout,
    stderr, return code, the killed server's URL, rows in the manifest when it was killed)."""
    work = tmp_path_factory.mktemp("batch")
    table = write_table(work / "table", ROWS)
    out = work / "out"
    # one torch thread per server: two servers on a 2-core machine would otherwise fight over the cores
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "humanref", "batch", str(WORKFLOW), "--table", str(table), "--comfyui",
           comfyui_path(), "--workers", "2", "--models", str(tiny_models), "--inputs", str(INPUTS), *SMALL,
           "--out", str(out), "--timeout", "240"]
    stdout_file = open(work / "stdout.txt", "w")
    proc = subprocess.Popen(cmd, cwd=str(work), env=env, stdout=stdout_file, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    victim, rows_at_kill = None, None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            ups = [line for line in list(lines) if ": ComfyUI is up at " in line]
            done = len(manifest(out)) if (out / "manifest.jsonl").exists() else 0
            if len(ups) == 2 and done >= 4:
                up = next(line for line in ups if line.startswith("s2:"))
                url = up.split("ComfyUI is up at ", 1)[1].split()[0]
                if queue_running(url):  # it is running one of our rows right now
                    pid = int(up.split("(pid ", 1)[1].split(",")[0])
                    os.killpg(pid, signal.SIGKILL)
                    victim, rows_at_kill = url, done
                    break
            time.sleep(0.05)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stdout_file.close()
    reader.join(timeout=10)
    stdout = (work / "stdout.txt").read_text()
    stderr = "".join(lines)
    assert victim is not None, "the second server was never seen running a row\n" + stderr
    return out, table, stdout, stderr, proc.returncode, victim, rows_at_kill, ups


def test_a_killed_server_every_row_completes_exactly_once(killed_run):
    out, table, stdout, stderr, code, victim, rows_at_kill, ups = killed_run
    assert code == 0, stderr
    entries = manifest(out)
    ids = [e["id"] for e in entries]
    assert sorted(ids) == [f"{i:04d}" for i in range(1, ROWS + 1)], ids  # each row exactly once
    assert all(e["status"] == "done" and e["error"] is None for e in entries)
    # the files: exactly the manifest's, one image per row in the row's folder, printed on stdout
    listed = sorted(f for e in entries for f in e["files"])
    assert pngs_under(out) == listed and len(listed) == ROWS
    assert sorted(stdout.split()) == sorted(str(out / f) for f in listed)
    for e in entries:
        assert len(e["files"]) == 1 and e["files"][0].startswith(e["id"] + "/")
        ran = prompt_of(out / e["files"][0])
        assert ran["13"]["inputs"]["seed"] == e["seed"] == 100 + e["row"] - 1  # the row's seed reached it
        assert ran["7"]["inputs"]["image"] == "face.png"  # the table's image, uploaded
        assert ran["13"]["inputs"]["steps"] == 3 and ran["1"]["inputs"]["ckpt_name"] == TINY_CKPT
    # the killed server: rows it finished before it died stay, what it held went to the other one
    urls = [line.split("ComfyUI is up at ", 1)[1].split()[0] for line in ups]
    survivor = next(url for url in urls if url != victim)
    assert {e["server"] for e in entries} <= {victim, survivor}
    on_victim = [e for e in entries if e["server"] == victim]
    assert len(on_victim) <= rows_at_kill + 1  # +1: one may finish between our count and the kill
    moved = [e for e in entries if any(a["server"] == victim and a["outcome"].startswith("server lost")
                                       for a in e["attempts"])]
    assert moved and all(e["server"] == survivor for e in moved)  # it was running one of our rows
    assert len(on_victim) + len([e for e in entries if e["server"] == survivor]) == ROWS
    assert "s2 (" + victim + ") is lost: its process ended" in stderr
    print(f"\nbatch: {ROWS} rows; {len(on_victim)} on the killed server (killed after {rows_at_kill} rows), "
          f"{ROWS - len(on_victim)} on {survivor}; {len(moved)} reassigned")
    # both servers stopped, their temporary folders gone
    for line in ups:
        url = line.split("ComfyUI is up at ", 1)[1].split()[0]
        temp = line.split("temporary folder ", 1)[1].strip().rstrip(")")
        assert not reachable(url) and not os.path.exists(temp)


def test_a_rerun_does_nothing(killed_run, tmp_path):
    """Same --out: every row is done, nothing is asked of any server (the one given does not exist)."""
    out, table = killed_run[0], killed_run[1]
    before = (out / "manifest.jsonl").read_bytes()
    files = pngs_under(out)
    proc = humanref_cli("batch", str(WORKFLOW), "--table", str(table), "--server", "http://127.0.0.1:9",
                        "--inputs", str(INPUTS), *SMALL, "--out", str(out), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"all {ROWS} rows are already done" in proc.stderr
    assert proc.stdout == ""
    assert (out / "manifest.jsonl").read_bytes() == before and pngs_under(out) == files


def test_bad_rows_are_reported_once_and_a_rerun_runs_only_them(server_url, client, tmp_path):
    """Row 2: steps 0 (the server rejects it); row 4: a corrupt image (the LoadImage node fails while running).
    Both reported, not retried; the other rows complete. Fixed and rerun: only rows 2 and 4 run."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    rows = [{"id": f"r{i}", "13.seed": 200 + i} for i in range(1, 6)]
    rows[1]["13.steps"] = 0
    rows[3]["Part: face.image"] = str(corrupt)
    rows[4]["Part: face.image"] = str(INPUTS / "upper.png")  # not the face mask's size: a warning, recorded
    table = tmp_path / "jobs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["batch", str(WORKFLOW), "--table", str(table), "--server", server_url, "--inputs", str(INPUTS),
            *SMALL, "--out", str(out)]
    history_before = len(client.get_json("/history"))
    proc = humanref_cli(*args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 1, proc.stderr
    entries = {e["id"]: e for e in manifest(out)}
    assert len(manifest(out)) == 5 and sorted(entries) == ["r1", "r2", "r3", "r4", "r5"]
    assert [entries[r]["status"] for r in ("r1", "r3", "r5")] == ["done"] * 3
    assert entries["r2"]["status"] == "failed" and "prompt rejected" in entries["r2"]["error"]
    assert "node 13 (KSampler)" in entries["r2"]["error"] and "steps" in entries["r2"]["error"]
    assert entries["r4"]["status"] == "failed" and "node 7 (LoadImage) failed" in entries["r4"]["error"]
    assert entries["r2"]["attempts"] == [] and entries["r4"]["attempts"] == []  # tried once each
    assert entries["r1"]["warnings"] == [] and entries["r5"]["warnings"]  # humanref_warnings from /history
    assert all(w.startswith("node 12 (HumanRef_Parts2Whole): mask_") for w in entries["r5"]["warnings"])
    assert f"row r5: warning: {entries['r5']['warnings'][0]}" in proc.stderr
    assert "failed: row r2" in proc.stderr and "failed: row r4" in proc.stderr
    # the rejected row never reached the queue; the other four ran once each
    assert len(client.get_json("/history")) - history_before == 4
    assert pngs_under(out) == sorted(f for e in entries.values() for f in e["files"])
    done_lines = {r: json.dumps(entries[r]) for r in ("r1", "r3", "r5")}

    rows[1].pop("13.steps")
    rows[3].pop("Part: face.image")
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = humanref_cli(*args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "3 of 5 rows already done" in proc.stderr
    assert sorted(Path(p).parent.parent.name for p in proc.stdout.split()) == ["r2", "r4"]
    lines = manifest(out)
    assert len(lines) == 7 and {e["id"] for e in lines[5:]} == {"r2", "r4"}
    assert all(e["status"] == "done" for e in lines[5:])
    assert {r: json.dumps(e) for e in lines[:5] for r in [e["id"]] if r in done_lines} == done_lines
    for e in lines[5:]:
        assert prompt_of(out / e["files"][0])["13"]["inputs"]["seed"] == e["seed"]
