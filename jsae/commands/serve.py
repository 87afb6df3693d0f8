"""`jsae serve gemma-3-270m --port 8000`: an OpenAI-compatible chat-completions endpoint on a
local address, over jsae's own generation (see jsae/serve.py)."""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_int, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a language model as an OpenAI-compatible chat endpoint (/v1/chat/completions)",
        description=(
            "Load MODEL (an offline name such as gemma-3-270m, a .gguf file, an HF safetensors "
            "folder or a hub id) and answer POST /v1/chat/completions and GET /v1/models on "
            "HOST:PORT until Ctrl-C. Chat turns use Gemma 3's template when the tokenizer has "
            "it. Point `jsae bench --autointerp-explainer http://HOST:PORT/v1` at it."),
    )
    p.add_argument("model", help="model name or path")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=nonneg_int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--name", help="model id reported by /v1/models and in replies (default: MODEL)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-tokens-limit", type=positive_int, default=1024,
                   help="largest max_tokens a request may ask for (default 1024)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    return p


def run(args) -> int:
    import sys

    from jsae.config import ConfigError

    if args.port > 65535:
        raise ConfigError(f"--port must be in 0..65535; got {args.port}")
    import jsae.models as M
    from jsae.serve import ChatModel, make_server

    def log(msg: str) -> None:
        print(f"jsae serve: {msg}", file=sys.stderr, flush=True)

    try:
        lm = M.load(args.model, dtype=args.dtype)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"model {args.model!r}: {' '.join(str(e).split())}") from None
    if getattr(lm, "tokenizer", None) is None:
        raise ConfigError(f"model {args.model!r} has no tokenizer: it cannot read chat messages")
    model = ChatModel(lm, args.name or args.model, max_tokens_limit=args.max_tokens_limit)
    try:
        srv = make_server(model, args.host, args.port, log=None if args.quiet else log)
    except OSError as e:
        raise ConfigError(f"--host/--port: cannot listen on {args.host}:{args.port} "
                          f"({e.strerror or e})") from None
    host, port = srv.server_address[:2]
    print(f"serving {model.name} at http://{host}:{port}/v1 (chat/completions, models); "
          "Ctrl-C stops", flush=True)

    def on_term(signum, frame):  # a service manager's stop: as clean as Ctrl-C
        raise KeyboardInterrupt

    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("jsae serve: stopped", file=sys.stderr, flush=True)
    finally:
        srv.server_close()
        if main:
            signal.signal(signal.SIGTERM, old)
    return 0
