"""Run agent turns in a fresh process (for restore tests): prints one JSON line per turn.

usage: python -m tests.support.agent_script CACHE_DIR BACKEND AGENT MESSAGE [MESSAGE ...]
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    cache_dir, backend, name, *messages = sys.argv[1:]
    os.environ["EDGE_INFER_CACHE_DIR"] = cache_dir
    from edge_infer import Engine

    eng = Engine.load(backend=backend)
    agent = eng.agent(name, system="You are a concise assistant.")
    for msg in messages:
        reply = agent.chat(msg, temperature=0, max_tokens=32)
        u = agent.usage
        print(json.dumps({"reply": reply, "prompt": u.prompt_tokens, "cached": u.cached_tokens}))
    eng.flush()


if __name__ == "__main__":
    main()
