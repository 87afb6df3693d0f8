"""`jsae serve`: a real HTTP server on 127.0.0.1 over a tiny random model answers OpenAI-style
chat completions with what the uncached reference generation gives; Gemma 3's chat template by
token id; bad requests are JSON 400s in one line; the command stops cleanly on Ctrl-C."""

from __future__ import annotations

import _thread
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_steering_helpers import TinyModel, TinyTokenizer

from jsae import cli
from jsae.analysis.atlas.explain import ChatClient
from jsae.models.generate import generate_tokens
from jsae.serve import ChatModel, chat_ids, make_server


@pytest.fixture(scope="module")
def tiny():
    return TinyModel()


@pytest.fixture(scope="module")
def server(tiny):
    srv = make_server(ChatModel(tiny, "tiny-chat", max_tokens_limit=64), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class GemmaLikeTokenizer(TinyTokenizer):
    """TinyTokenizer plus Gemma's turn tokens (ids 90, 91) looked up by name."""

    SPECIAL = {"<start_of_turn>": 90, "<end_of_turn>": 91}

    def token_to_id(self, s):
        return self.SPECIAL.get(s)


def test_chat_template_gemma_and_plain():
    tok = GemmaLikeTokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Sum?"}]
    ids, stops = chat_ids(tok, msgs)
    e = lambda s: tok.encode(s, add_bos=False)  # noqa: E731
    want = ([2, 90] + e("user\nBe brief.\n\nHi") + [91] + e("\n") + [90] + e("model\nYo") + [91]
            + e("\n") + [90] + e("user\nSum?") + [91] + e("\n") + [90] + e("model\n"))
    assert ids == want and stops == [91, 1]
    plain, stops = chat_ids(TinyTokenizer(), msgs[:2])
    assert plain == [2] + e("System: Be brief.\n\nUser: Hi\n\nAssistant:") and stops == [1]


def test_chat_completion_matches_reference_generation(server, tiny):
    msgs = [{"role": "system", "content": "You explain."}, {"role": "user", "content": "abc def"}]
    code, rep = _post(server + "/v1/chat/completions",
                      {"model": "tiny-chat", "messages": msgs, "max_tokens": 7, "temperature": 0})
    assert code == 200, rep
    assert rep["object"] == "chat.completion" and rep["model"] == "tiny-chat"
    ids, _ = chat_ids(tiny.tokenizer, msgs)
    ref = generate_tokens(tiny.cfg, tiny.params, [ids], 7, use_cache=False, eos_id=1)[0]
    ref = [int(t) for t in ref if t >= 0]
    stopped = 1 in ref
    ref = ref[: ref.index(1)] if stopped else ref
    choice = rep["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": tiny.tokenizer.decode(ref)}
    assert choice["finish_reason"] == ("stop" if stopped else "length")
    assert rep["usage"]["prompt_tokens"] == len(ids)
    assert rep["usage"]["total_tokens"] == len(ids) + rep["usage"]["completion_tokens"]
    # jsae's own OpenAI-style client (what autointerp uses) gets the same text
    assert ChatClient(server + "/v1", model="tiny-chat", max_tokens=7).chat(
        "You explain.", "abc def") == choice["message"]["content"]
    # sampling honours the seed: same seed, same text
    body = {"messages": msgs, "max_tokens": 12, "temperature": 1.5, "seed": 11}
    a, b = _post(server + "/v1/chat/completions", body)[1], _post(server + "/v1/chat/completions", body)[1]
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    with urllib.request.urlopen(server + "/v1/models", timeout=10) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["tiny-chat"]


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not JSON"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens must be an integer"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}, "in [1, 64]"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n must be 1"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_are_one_line_400s(server, body, needle):
    raw = body if isinstance(body, bytes) else None
    code, rep = _post(server + "/v1/chat/completions", body, raw)
    assert code == 400
    msg = rep["error"]["message"]
    assert needle in msg and "\n" not in msg and rep["error"]["type"] == "invalid_request_error"


def test_unknown_endpoint_is_404(server):
    code, rep = _post(server + "/v1/completions", {"prompt": "x"})
    assert code == 404 and "/v1/chat/completions" in rep["error"]["message"]


def test_serve_command_answers_then_stops_on_ctrl_c(tiny, monkeypatch, capsys):
    import jsae.models

    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": tiny)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    got = {}

    def client():
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(200):  # until the server listens
            try:
                got["reply"] = _post(url, {"messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 3, "temperature": 0})
                break
            except urllib.error.URLError:
                time.sleep(0.05)
        _thread.interrupt_main()  # Ctrl-C

    # pytest-xdist's workers ignore SIGINT (execnet), and interrupt_main() then does nothing:
    # the server would never stop. Ctrl-C as a shell delivers it: Python's default handler.
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        assert cli.main(["serve", "tiny", "--port", str(port), "--name", "t"]) == 0
    finally:
        signal.signal(signal.SIGINT, old)
    t.join(5)
    code, rep = got["reply"]
    assert code == 200 and rep["model"] == "t"
    out, err = capsys.readouterr()
    assert f"at http://127.0.0.1:{port}/v1" in out and "jsae serve: stopped" in err
    with pytest.raises(OSError):  # the port is closed
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert np.isscalar(rep["usage"]["prompt_tokens"])


SERVE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jsae.models
from test_steering_helpers import TinyModel
m = TinyModel()
jsae.models.load = lambda name, dtype="float32": m
from jsae import cli
sys.exit(cli.main(["serve", "tiny", "--port", "0", "--quiet"]))
"""


def test_serve_process_stops_cleanly_on_sigterm():
    """A service manager's stop (Ctrl-C in-process: test_serve_command_answers_then_stops_on_ctrl_c)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT.format(tests=str(Path(__file__).parent))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        url = re.search(r"at (http://\S+/v1)", line).group(1)
        code, rep = _post(url + "/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 2})
        assert code == 200
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and err.strip().splitlines()[-1] == "jsae serve: stopped"


@pytest.mark.slow
def test_real_gemma_chat_completion_matches_uncached_generation():
    """Gemma 3 270M through the server: Gemma's turn template by id, and the cached, jitted
    reply equals re-running the whole forward per token."""
    from jsae.models import load

    lm = load("gemma-3-270m")
    srv = make_server(ChatModel(lm, "gemma-3-270m"), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    msgs = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the sky?"}]
    try:
        code, rep = _post(f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions",
                          {"messages": msgs, "max_tokens": 6, "temperature": 0})
    finally:
        srv.shutdown()
        srv.server_close()
    assert code == 200, rep
    tok = lm.tokenizer
    ids, stops = chat_ids(tok, msgs)
    assert tok.token_to_id("<start_of_turn>") == 105 and stops == [106, 1]
    assert ids[:3] == [2, 105, *tok.encode("user", add_bos=False)]
    assert tok.decode(ids, skip_special_tokens=False).endswith("<start_of_turn>model\n")
    ref = generate_tokens(lm.cfg, lm.params, [ids], 6, use_cache=False, eos_id=106, pad_id=lm.pad_id)[0]
    ref = [int(t) for t in ref if t >= 0]
    ref = ref[: ref.index(106)] if 106 in ref else ref
    assert rep["choices"][0]["message"]["content"] == tok.decode(ref)
    assert rep["usage"]["prompt_tokens"] == len(ids)
