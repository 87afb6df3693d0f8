"""The explainer against a fake LLM served on 127.0.0.1 by this test: prompts carry the marked
tokens, explanations and detection scores land in the atlas, the disk cache makes a rerun free,
errors are retried or reported in one line."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from atlas_fixtures import WORDS, random_atlas_data

from jsae.analysis.atlas.explain import (
    DETECT_SYSTEM,
    EXPLAIN_SYSTEM,
    ChatClient,
    ExplainerError,
    explain_atlas,
)


class FakeLLM(BaseHTTPRequestHandler):
    """Explanation: the token marked most often. Detection: 1 where that word occurs."""

    log: list = []
    fail_next: list = []  # HTTP codes to answer before answering normally

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLM.log.append((self.path, body))
        if FakeLLM.fail_next:
            self.send_response(FakeLLM.fail_next.pop(0))
            self.end_headers()
            return
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system == EXPLAIN_SYSTEM:
            marks = Counter(re.findall(r"<<(.+?)>>", user))
            answer = marks.most_common(1)[0][0] if marks else "nothing"
        else:
            assert system == DETECT_SYSTEM
            word = re.search(r"Feature description: (.*)", user).group(1)
            ex = re.findall(r"Excerpt \d+: (.*)", user)
            answer = json.dumps([int(word in e) for e in ex])
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_explanations_and_detection_scores(server, tmp_path):
    data = random_atlas_data(120, seed=4, k=8, q=4, s=3, w=12, explanations=False)
    plain = [r for r in range(data.n_features)
             if data.density[r] > 0 and data.top_tokens[r].max() < len(WORDS)][:12]
    feats = data.feature_ids[plain]
    FakeLLM.log.clear()
    client = ChatClient(server, model="fake", cache_dir=tmp_path / "cache")
    explain_atlas(data, client, features=feats, progress=False)
    assert client.requests == 2 * len(feats) and len(FakeLLM.log) == 2 * len(feats)
    assert FakeLLM.log[0][0] == "/v1/chat/completions" and FakeLLM.log[0][1]["model"] == "fake"
    assert "<<" in FakeLLM.log[0][1]["messages"][1]["content"]
    hits = 0
    for r in plain:
        anchors = np.take_along_axis(data.top_tokens[r], data.top_anchor[r][:, None], 1)[:, 0]
        theme = Counter(data.token_str[int(t)].strip() for t in anchors).most_common(1)[0][0]
        hits += data.explanations[r] == theme
        assert 0 <= data.explanation_scores[r] <= 1
    assert hits >= len(plain) - 2  # the marked theme token is what the fake LLM names
    scores = data.explanation_scores[plain]
    assert np.nanmean(scores) > 0.65  # band samples carry the theme; other features' mostly not
    assert np.isnan(np.delete(data.explanation_scores, plain)).all()
    # a rerun is answered from the disk cache: no request reaches the server
    again = ChatClient(server, model="fake", cache_dir=tmp_path / "cache")
    before = [e for e in data.explanations]
    explain_atlas(data, again, features=feats, progress=False)
    assert again.requests == 0 and len(FakeLLM.log) == 2 * len(feats)
    assert data.explanations == before
    assert "detection" in data.meta["explanation_score"]


def test_retries_and_one_line_errors(server, tmp_path):
    FakeLLM.fail_next[:] = [503, 429]
    c = ChatClient(server, retries=3)
    c.chat(EXPLAIN_SYSTEM, "Example 1: the <<river>> bank")
    assert c.requests == 3
    FakeLLM.fail_next[:] = [400]
    with pytest.raises(ExplainerError, match="HTTP 400") as e:
        ChatClient(server).chat(EXPLAIN_SYSTEM, "x")
    assert "\n" not in str(e.value)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ExplainerError, match="failed after 2 tries") as e:
        ChatClient(f"http://127.0.0.1:{port}", retries=1, timeout=2).chat(EXPLAIN_SYSTEM, "x")
    assert "\n" not in str(e.value)
