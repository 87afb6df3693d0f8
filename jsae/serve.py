"""An OpenAI-compatible chat-completions server over a jsae language model (``jsae serve``).

``POST /v1/chat/completions`` and ``GET /v1/models`` on a local address, answered by jsae's own
generation (KV cache, jitted decode loop; prompt and output lengths are bucketed, so requests of
similar sizes reuse one compiled program). Any OpenAI client, and jsae's own autointerp
(``jsae bench --autointerp-explainer``), can point at it: on a GPU, a chat model such as
Gemma 3 12B IT writes real explanations; on a CPU, a tiny model tests the plumbing.

Messages are laid out with Gemma 3's turn template (``<start_of_turn>user ... <end_of_turn>``,
a system message folded into the first user turn, as Gemma's own template does) when the
tokenizer has those tokens, else as plain ``Role: content`` lines. One request at a time runs
through the model (a lock); the HTTP server itself is threaded, so a waiting client is not
refused. A bad request is answered 400 with a one-line message in OpenAI's error layout.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLES = ("system", "user", "assistant")
MAX_BODY = 8 << 20  # bytes of one request body
PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this: fewer compiled programs


class BadRequest(ValueError):
    """A request this server refuses (answered 400 with the message)."""


def _special(tok, text: str) -> int | None:
    f = getattr(tok, "token_to_id", None)
    i = f(text) if f is not None else None
    return None if i is None else int(i)


def chat_ids(tok, messages: Sequence[dict], *, add_bos: bool | None = None
             ) -> tuple[list[int], list[int]]:
    """``(prompt ids, stop ids)`` of a conversation ready for the assistant's next turn.

    Gemma 3 layout where the tokenizer has ``<start_of_turn>``/``<end_of_turn>``:
    ``<bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n``
    (assistant turns are ``model`` turns); stop ids: ``<end_of_turn>`` and EOS. Otherwise plain
    ``System: ...\\n\\nUser: ...\\n\\nAssistant:``; stop id: EOS. Special tokens are inserted by
    id, never parsed from message text.
    """
    bos = getattr(tok, "bos_id", None)
    eos = getattr(tok, "eos_id", None)
    if add_bos is None:
        add_bos = getattr(tok, "add_bos_default", True)
    start, end = _special(tok, "<start_of_turn>"), _special(tok, "<end_of_turn>")
    ids = [int(bos)] if add_bos and bos is not None else []
    stops = [int(eos)] if eos is not None else []
    if start is not None and end is not None:
        turns, system = [], []
        for m in messages:
            if m["role"] == "system":
                system.append(m["content"])
                continue
            content = m["content"]
            if system and m["role"] == "user":
                content = "\n\n".join(system + [content])
                system = []
            turns.append(("model" if m["role"] == "assistant" else "user", content))
        if system:  # only system text: it is the user's turn
            turns.append(("user", "\n\n".join(system)))
        for role, content in turns:
            ids += [start] + tok.encode(f"{role}\n{content}", add_bos=False) + [end]
            ids += tok.encode("\n", add_bos=False)
        ids += [start] + tok.encode("model\n", add_bos=False)
        return ids, [end] + stops
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return ids + tok.encode(text, add_bos=False), stops


def _content(v, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{key} must be {kind} in [{lo:g}, {hi:g}]; got {json.dumps(v)}")
    return v


def parse_request(body, *, max_tokens_limit: int) -> dict:
    """Check a chat-completions request body; returns ``messages, max_tokens, temperature,
    top_p, seed``. Raises :class:`BadRequest` (one line) for anything this server cannot do."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": _content(m.get("content"), i)})
    if body.get("stream"):
        raise BadRequest("stream is not supported by jsae serve; send stream: false")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1 (one completion per request)")
    limit = max_tokens_limit
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {
        "messages": messages,
        "max_tokens": _number(body, key, min(256, limit), 1, limit, integer=True),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        "seed": _number(body, "seed", None, 0, 2**31 - 1, integer=True),
    }


class ChatModel:
    """A jsae LanguageModel answering chat requests one at a time."""

    def __init__(self, lm, name: str | None = None, *, max_tokens_limit: int = 1024):
        self.lm = lm
        self.name = name or str(getattr(lm, "name", "jsae"))
        self.max_tokens_limit = int(max_tokens_limit)
        self.lock = threading.Lock()
        self.created = int(time.time())

    def complete(self, messages, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> dict:
        """``{text, finish_reason ("stop"|"length"), prompt_tokens, completion_tokens}``."""
        import jax

        from jsae.models.generate import generate_tokens

        tok = self.lm.tokenizer
        ids, stops = chat_ids(tok, messages)
        limit = int(getattr(self.lm.cfg, "max_position", 1 << 30))
        if len(ids) + max_tokens > limit:
            raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                             f"exceeds the model's {limit} positions")
        if seed is None:
            seed = secrets.randbits(31)
        with self.lock:
            out = generate_tokens(self.lm.cfg, self.lm.params, [ids], max_tokens,
                                  temperature=temperature, top_p=top_p,
                                  key=jax.random.PRNGKey(seed),
                                  eos_id=stops[0] if stops else None, pad_id=self.lm.pad_id,
                                  pad_multiple=PROMPT_BUCKET)
        row = [int(t) for t in out[0] if t >= 0]
        cut = [row.index(s) for s in stops if s in row]
        finish = "stop" if cut else "length"
        row = row[: min(cut)] if cut else row
        return {"text": tok.decode(row), "finish_reason": finish,
                "prompt_tokens": len(ids), "completion_tokens": len(row) + (1 if cut else 0)}


def _handler(model: ChatModel, log: Callable[[str], None] | None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "jsae-serve"
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                if log:
                    log(f"client {self.client_address[0]}:{self.client_address[1]} left before "
                        "the reply")

        def _error(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(code, {"error": {"message": message, "type": kind, "param": None,
                                        "code": None}})

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": model.name, "object": "model", "created": model.created,
                     "owned_by": "jsae"}]})
            else:
                self._error(404, f"no such endpoint: GET {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(n, MAX_BODY))
                self._error(404, f"no such endpoint: POST {self.path} "
                                 "(this server answers /v1/chat/completions)")
                return
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n <= 0 or n > MAX_BODY:
                    raise BadRequest(f"the request body must be 1 to {MAX_BODY} bytes of JSON; "
                                     f"got {n}")
                try:
                    body = json.loads(self.rfile.read(n).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadRequest(f"the request body is not JSON ({e.__class__.__name__}: "
                                     f"{str(e).splitlines()[0]})") from None
                req = parse_request(body, max_tokens_limit=model.max_tokens_limit)
                t0 = time.perf_counter()
                res = model.complete(req["messages"], req["max_tokens"], req["temperature"],
                                     req["top_p"], req["seed"])
            except BadRequest as e:
                self._error(400, str(e))
                return
            except Exception as e:  # noqa: BLE001 - the client gets one line, the server lives
                self._error(500, f"generation failed: {type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0]}", "server_error")
                return
            if log:
                log(f"{res['prompt_tokens']} + {res['completion_tokens']} tokens in "
                    f"{time.perf_counter() - t0:.2f}s")
            self._send(200, {
                "id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
                "created": int(time.time()), "model": model.name,
                "choices": [{"index": 0, "finish_reason": res["finish_reason"],
                             "message": {"role": "assistant", "content": res["text"]}}],
                "usage": {"prompt_tokens": res["prompt_tokens"],
                          "completion_tokens": res["completion_tokens"],
                          "total_tokens": res["prompt_tokens"] + res["completion_tokens"]},
            })

        def log_message(self, *a):  # requests are logged by `log` above, not to stderr
            pass

    return Handler


def make_server(model: ChatModel, host: str = "127.0.0.1", port: int = 8000, *,
                log: Callable[[str], None] | None = None) -> ThreadingHTTPServer:
    """A threaded HTTP server (not started: call ``serve_forever``) answering for ``model``.
    ``port=0`` picks a free port (``server.server_address[1]``)."""
    srv = ThreadingHTTPServer((host, port), _handler(model, log))
    srv.daemon_threads = True
    return srv


__all__ = ["BadRequest", "ChatModel", "chat_ids", "make_server", "parse_request"]
