"""The client's reading of a run without a server: how a finished /history entry fails, and a server that dies
under a prompt (nothing listens at its port any more) failing the run at once instead of after the timeout."""
from __future__ import annotations

import socket
import time

import pytest
import websocket

from humanref.cli.client import (
    ComfyClient,
    ExecutionFailed,
    Interrupted,
    ServerLost,
    Unreachable,
    history_failure,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClosedSocket:
    """A websocket whose server went away: every receive fails as websocket-client fails then."""

    def settimeout(self, _seconds: float) -> None:
        pass

    def recv(self):
        raise websocket.WebSocketConnectionClosedException("Connection to remote host was lost.")

    def close(self) -> None:
        pass


class QuietSocket(ClosedSocket):
    """A websocket that stays open and silent (a server busy in one long step)."""

    def recv(self):
        time.sleep(0.05)
        raise websocket.WebSocketTimeoutException("timed out")


def queued_on(url: str, ws) -> ComfyClient:
    """A client whose prompt was queued just before the server died: the rest goes over the real HTTP path."""
    client = ComfyClient(url, timeout=5)
    client.connect_ws = lambda timeout=30.0: ws
    client.queue_prompt = lambda prompt, extra_data=None: "p1"
    return client


def test_a_server_that_dies_under_the_prompt_fails_the_run_soon_not_at_the_timeout():
    client = queued_on(f"http://127.0.0.1:{free_port()}", ClosedSocket())
    start = time.monotonic()
    with pytest.raises(ServerLost, match="stopped answering while prompt p1 was queued or running"):
        client.run({}, timeout=120, lost_after=1.0)
    assert time.monotonic() - start < 10


def test_a_local_server_that_exited_fails_the_run_at_once():
    client = queued_on(f"http://127.0.0.1:{free_port()}", QuietSocket())
    start = time.monotonic()
    with pytest.raises(ServerLost, match="exited while prompt p1"):
        client.run({}, timeout=120, alive=lambda: False)
    assert time.monotonic() - start < 10


def test_a_server_silent_for_less_than_lost_after_is_waited_for():
    """A blip (two unanswered polls) is not a lost server: the run ends with the prompt's outputs."""
    client = queued_on("http://127.0.0.1:1", ClosedSocket())
    answers = [Unreachable("cannot reach"), Unreachable("cannot reach"),
               {"status": {"status_str": "success", "completed": True}, "outputs": {"9": {"images": []}}}]

    def history(prompt_id, timeout=None):
        answer = answers[0] if len(answers) == 1 else answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client.history = history
    result = client.run({}, timeout=60, lost_after=30)
    assert result.prompt_id == "p1" and result.outputs == {"9": {"images": []}}


def entry(*messages, status="error") -> dict:
    return {"status": {"status_str": status, "completed": status == "success", "messages": list(messages)}}


def test_history_failure_reads_each_end_of_a_prompt():
    assert history_failure(entry(["execution_start", {}], ["execution_success", {}], status="success")) is None
    assert history_failure({}) is None  # not finished yet
    failed = history_failure(entry(["execution_error", {"node_id": "8", "node_type": "HumanRef_ReferenceEncoder",
                                                        "exception_type": "ValueError",
                                                        "exception_message": "mask_1 is empty"}]))
    assert isinstance(failed, ExecutionFailed)
    assert str(failed) == "node 8 (HumanRef_ReferenceEncoder) failed: ValueError: mask_1 is empty"
    stopped = history_failure(entry(["execution_interrupted", {"node_id": "13", "node_type": "KSampler"}]))
    assert isinstance(stopped, Interrupted) and str(stopped) == "interrupted on the server at node 13 (KSampler)"


def test_a_run_whose_history_says_interrupted_raises_interrupted():
    """The websocket closed before the interruption event: /history alone tells the runner (it said 'failed:
    {status dict}' before)."""
    client = queued_on("http://127.0.0.1:1", ClosedSocket())
    client.history = lambda prompt_id, timeout=None: entry(["execution_interrupted",
                                                            {"node_id": "13", "node_type": "KSampler"}])
    with pytest.raises(Interrupted, match="at node 13 \\(KSampler\\)"):
        client.run({}, timeout=30)
