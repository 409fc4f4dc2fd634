"""Run agent turns with an image in a fresh process (for restore tests): one JSON line per turn.

usage: python -m tests.support.image_agent_script VLM BACKEND AGENT IMAGE|- MESSAGE [MESSAGE ...]
(the image goes with the first message; ``-`` sends none)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def image_agent_turns(
    vlm: Path, backend: str, cache_dir: Path, name: str, image: Path | str, *turns: str
) -> list[dict]:
    """The turns' replies, prompt/cached/image token counts and the agent's token ids."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.image_agent_script", str(vlm), backend, name]
        + [str(image), *turns],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "EDGE_INFER_CACHE_DIR": str(cache_dir)},
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    from edge_infer.engine import Engine

    vlm, backend, name, image, *turns = sys.argv[1:]
    eng = Engine.load(vlm, backend, kv_bits=16, visual_method="full")
    agent = eng.agent(name)
    for i, text in enumerate(turns):
        images = [image] if i == 0 and image != "-" else []
        reply = agent.chat(text, images=images, max_tokens=6, temperature=0.0, ignore_eos=True)
        u = agent.usage
        ids = eng.agent_manager.state(name).token_ids
        print(
            json.dumps(
                {
                    "reply": reply,
                    "prompt": u.prompt_tokens,
                    "cached": u.cached_tokens,
                    "image": u.image_tokens,
                    "ids": ids,
                }
            )
        )
    eng.flush()


if __name__ == "__main__":
    main()
