"""A small ComfyUI HTTP/websocket client (stdlib urllib + websocket-client); talks to one server only.

Proxies from the environment are ignored on purpose: every request goes straight to the given server.
"""
from __future__ import annotations

import json
import mimetypes
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..pipelines.notices import MARK, UI_KEY


class ComfyError(RuntimeError):
    """An error reported by the server (or the server being unreachable); str() is the text to show."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400: the prompt failed validation."""

    def __init__(self, body: Any):
        self.body = body
        super().__init__(format_rejection(body))


class ExecutionFailed(ComfyError):
    """A node raised while the prompt ran (the execution_error event)."""

    def __init__(self, data: dict):
        self.data = data
        super().__init__(format_execution_error(data))


class Interrupted(ComfyError):
    """The prompt was interrupted on the server (the execution_interrupted event)."""


class Unreachable(ComfyError):
    """Nothing answers at the server's address (connection refused, reset or timed out)."""


class ServerLost(ComfyError):
    """The server stopped answering while our prompt was queued or running (it exited or crashed)."""


LOST_AFTER = 15.0  # seconds without an answer, while a prompt is ours, before the server counts as gone


def format_rejection(body: Any) -> str:
    if not isinstance(body, dict):
        return f"prompt rejected: {body}"
    err = body.get("error")
    lines = []
    if isinstance(err, dict):
        head = err.get("message") or err.get("type") or "prompt rejected"
        details = err.get("details")
        lines.append(f"prompt rejected: {head}" + (f": {details}" if details else ""))
    elif err:
        lines.append(f"prompt rejected: {err}")
    else:
        lines.append("prompt rejected")
    for nid, info in sorted((body.get("node_errors") or {}).items(), key=lambda kv: str(kv[0])):
        ctype = info.get("class_type", "?")
        for e in info.get("errors") or []:
            msg = e.get("message", "")
            details = e.get("details")
            lines.append(f"  node {nid} ({ctype}): {msg}" + (f": {details}" if details else ""))
    return "\n".join(lines)


def format_execution_error(data: dict) -> str:
    node = data.get("node_id", "?")
    ntype = data.get("node_type", "?")
    etype = data.get("exception_type", "")
    msg = str(data.get("exception_message", "")).strip()
    return f"node {node} ({ntype}) failed: {etype + ': ' if etype else ''}{msg}"


def interrupted_text(data: dict) -> str:
    return f"interrupted on the server at node {data.get('node_id')} ({data.get('node_type')})"


def history_failure(entry: dict) -> Optional[ComfyError]:
    """The error a finished /history entry records (a node's exception, an interruption), or None if it succeeded.

    One reading for the runner and the batch scheduler (which only polls /history)."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return None
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            return ExecutionFailed(data)
        if kind == "execution_interrupted":
            return Interrupted(interrupted_text(data or {}))
    return ComfyError(f"the prompt failed: {status}")


@dataclass
class RunResult:
    prompt_id: str
    history: dict
    outputs: dict = field(default_factory=dict)
    cached: list = field(default_factory=list)
    seconds: float = 0.0
    node_texts: dict = field(default_factory=dict)  # node id -> texts the node showed (progress text)

    def warnings(self) -> list[tuple[str, str]]:
        """(node id, message) for every warning of the run: the HumanRef nodes' ``humanref_warnings`` UI output
        (in /history) and any other text a node showed while it ran (a warning given inside KSampler)."""
        found: list[tuple[str, str]] = []
        for nid, out in self.outputs.items():
            for w in (out or {}).get(UI_KEY) or []:
                found.append((str(nid), str(w)))
        seen = {(nid, w) for nid, w in found}
        for nid, texts in self.node_texts.items():
            for text in texts:
                for line in text.splitlines():
                    line = line.removeprefix(MARK).strip()
                    if line and (str(nid), line) not in seen:
                        seen.add((str(nid), line))
                        found.append((str(nid), line))
        return found


PROGRESS_TEXT = 3  # ComfyUI's binary websocket event: [u32 event][u32 len][node id][utf-8 text]


def parse_progress_text(frame: bytes) -> Optional[tuple[str, str]]:
    """(node id, text) from a binary websocket frame that is a node's progress text, else None."""
    if len(frame) < 8 or struct.unpack(">I", frame[:4])[0] != PROGRESS_TEXT:
        return None
    (n,) = struct.unpack(">I", frame[4:8])
    try:
        return frame[8:8 + n].decode("utf-8"), frame[8 + n:].decode("utf-8")
    except UnicodeDecodeError:
        return None


class ComfyClient:
    def __init__(self, url: str, timeout: float = 60.0):
        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ComfyError(f"not a server URL: {url}")
        self.url = url
        self.host = parsed.hostname
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, data: Optional[bytes] = None, headers: Optional[dict] = None,
                 timeout: Optional[float] = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(f"cannot reach ComfyUI at {self.url}: {reason}") from None

    def get_json(self, path: str, timeout: Optional[float] = None) -> Any:
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path}: HTTP {status}: {body[:500].decode('utf-8', 'replace')}")
        return json.loads(body)

    def post_json(self, path: str, payload: Any, timeout: Optional[float] = None) -> tuple[int, Any]:
        status, body = self._request("POST", path, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"}, timeout)
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def object_info(self, node_type: Optional[str] = None) -> dict:
        path = "/object_info" if node_type is None else "/object_info/" + urllib.parse.quote(node_type, safe="")
        return self.get_json(path, timeout=max(self.timeout, 120))

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def upload_image(self, path: str, subfolder: str = "", overwrite: bool = False) -> str:
        """POST /upload/image; returns the value to put into a LoadImage 'image' input."""
        name = os.path.basename(path)
        with open(path, "rb") as f:
            content = f.read()
        boundary = "----humanref" + uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        parts = []
        fields = {"type": "input", "subfolder": subfolder}
        if overwrite:
            fields["overwrite"] = "true"
        for key, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        safe = name.replace('"', "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = self._request("POST", "/upload/image", b"".join(parts),
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise ComfyError(f"uploading {path} failed: HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue_prompt(self, prompt: dict, extra_data: Optional[dict] = None) -> str:
        payload: dict = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        status, body = self.post_json("/prompt", payload)
        if status == 400 or (isinstance(body, dict) and body.get("node_errors") and "prompt_id" not in body):
            raise PromptRejected(body)
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise ComfyError(f"POST /prompt: HTTP {status}: {body}")
        return body["prompt_id"]

    def history(self, prompt_id: str, timeout: Optional[float] = None) -> dict:
        return self.get_json("/history/" + urllib.parse.quote(prompt_id, safe=""), timeout=timeout).get(prompt_id) \
            or {}

    def view(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        status, body = self._request("GET", "/view?" + query, timeout=max(self.timeout, 120))
        if status != 200:
            raise ComfyError(f"GET /view {filename}: HTTP {status}")
        return body

    def cancel(self, prompt_id: str) -> None:
        """Best effort: drop the prompt from the queue, or interrupt it if it is the one running."""
        for path, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.post_json(path, payload, timeout=5)
            except ComfyError:
                pass

    # ------------------------------------------------------------------ websocket
    def connect_ws(self, timeout: float = 30.0):
        import websocket  # websocket-client

        scheme = "wss" if self.url.startswith("https") else "ws"
        ws_url = f"{scheme}://{self.url.split('://', 1)[1]}/ws?clientId={self.client_id}"
        try:
            return websocket.create_connection(ws_url, timeout=timeout, http_no_proxy=["*"])
        except Exception as e:  # noqa: BLE001 - any failure to connect is reported the same way
            raise Unreachable(f"cannot open the websocket {ws_url}: {e}") from None

    def run(self, prompt: dict, extra_data: Optional[dict] = None, timeout: float = 600.0,
            on_event: Optional[Callable[[str, dict], None]] = None, alive: Optional[Callable[[], bool]] = None,
            lost_after: float = LOST_AFTER) -> RunResult:
        """Queue a prompt and wait for it over the websocket (polling /history if the socket drops).

        A server that dies under the prompt fails the run within ``lost_after`` seconds of silence (at once when
        ``alive``, a local server's process check, says it exited), not after the whole ``timeout``.
        Raises PromptRejected, ExecutionFailed, Interrupted, ServerLost, ComfyError (timeout, connection).
        """
        import websocket

        start = time.monotonic()
        deadline = start + timeout
        watch = _Watch(self.url, alive, lost_after)
        ws = self.connect_ws(timeout=min(30.0, timeout))
        cached: list = []
        texts: dict[str, list[str]] = {}
        prompt_id = None
        try:
            prompt_id = self.queue_prompt(prompt, extra_data)
            if on_event:
                on_event("queued", {"prompt_id": prompt_id})
            done = False
            while not done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ComfyError(f"timed out after {timeout:.0f} s waiting for prompt {prompt_id}")
                ws.settimeout(min(left, 5.0))
                try:
                    frame = ws.recv()
                except websocket.WebSocketTimeoutException:
                    # nothing for a while: make sure we did not miss the end (or lose the server)
                    done = self._finished(prompt_id, watch)
                    continue
                except (websocket.WebSocketException, OSError):
                    done = self._poll_until_done(prompt_id, deadline, watch)
                    break
                if not isinstance(frame, str):  # previews, and texts a node shows
                    shown = parse_progress_text(frame) if prompt_id is not None else None
                    if shown is not None:
                        texts.setdefault(shown[0], []).append(shown[1])
                        if on_event:
                            on_event("progress_text", {"node": shown[0], "text": shown[1]})
                    continue
                try:
                    msg = json.loads(frame)
                except ValueError:
                    continue
                mtype, data = msg.get("type"), msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if mtype in ("status", "progress_state", "crystools.monitor"):
                    continue
                if data.get("prompt_id") is None and mtype != "progress":
                    continue
                if on_event:
                    on_event(mtype, data)
                if mtype == "execution_cached":
                    cached = list(data.get("nodes") or [])
                elif mtype == "execution_error":
                    raise ExecutionFailed(data)
                elif mtype == "execution_interrupted":
                    raise Interrupted(f"prompt {prompt_id} was {interrupted_text(data)}")
                elif mtype == "executing" and data.get("node") is None:
                    done = True  # sent after the history entry is written (execution_success comes before)
        except (ExecutionFailed, Interrupted):
            raise  # the server is done with the prompt
        except BaseException:
            # Ctrl-C, timeout, lost connection: do not leave our prompt queued or running on the server
            if prompt_id is not None and not isinstance(self._last_status(prompt_id), dict):
                self.cancel(prompt_id)
            raise
        finally:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
        history = self._wait_history(prompt_id, deadline)
        failure = history_failure(history)
        if failure is not None:
            raise failure
        return RunResult(prompt_id, history, history.get("outputs") or {}, cached, time.monotonic() - start, texts)

    def _wait_history(self, prompt_id: str, deadline: float) -> dict:
        while True:
            history = self.history(prompt_id)
            if history.get("status") or time.monotonic() > deadline:
                return history
            time.sleep(0.2)

    def _last_status(self, prompt_id: str, watch: Optional[_Watch] = None) -> Any:
        if watch is not None:
            watch.check(prompt_id)
        try:
            status = self.history(prompt_id, timeout=min(self.timeout, 10.0)).get("status")
        except Unreachable:
            if watch is not None:
                watch.no_answer(prompt_id)
            return None
        except ComfyError:
            return None
        if watch is not None:
            watch.answered()
        return status

    def _finished(self, prompt_id: str, watch: Optional[_Watch] = None) -> bool:
        status = self._last_status(prompt_id, watch)
        return isinstance(status, dict) and bool(status.get("completed") or status.get("status_str"))

    def _poll_until_done(self, prompt_id: str, deadline: float, watch: Optional[_Watch] = None) -> bool:
        while time.monotonic() < deadline:
            if self._finished(prompt_id, watch):
                return True
            time.sleep(0.5)
        raise ComfyError(f"timed out waiting for prompt {prompt_id} (websocket closed)")


@dataclass
class _Watch:
    """When a server that stopped answering counts as gone, while one of our prompts is on it."""

    url: str
    alive: Optional[Callable[[], bool]] = None
    lost_after: float = LOST_AFTER
    silent_since: Optional[float] = None

    def check(self, prompt_id: str) -> None:
        if self.alive is not None and not self.alive():
            raise ServerLost(f"ComfyUI at {self.url} exited while prompt {prompt_id} was queued or running")

    def answered(self) -> None:
        self.silent_since = None

    def no_answer(self, prompt_id: str) -> None:
        now = time.monotonic()
        if self.silent_since is None:
            self.silent_since = now
        elif now - self.silent_since >= self.lost_after:
            raise ServerLost(f"ComfyUI at {self.url} stopped answering while prompt {prompt_id} was queued or "
                             f"running (no answer for {now - self.silent_since:.0f} s): the server exited or "
                             "crashed; its log says why")
