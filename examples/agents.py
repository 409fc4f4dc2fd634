"""Two agents that keep their conversations (and KV caches) between runs.

Run it twice: the second run restores both agents from disk and only prefills the new turn.

    .venv/bin/python examples/agents.py
"""

from __future__ import annotations

from edge_infer import Engine


def show(label: str, agent) -> None:
    u = agent.usage
    print(
        f"  [{label}: prompt {u.prompt_tokens} tok, {u.cached_tokens} from cache, "
        f"TTFT {u.ttft_s * 1000:.0f} ms, {u.decode_tokens_per_s:.0f} tok/s]"
    )


def main() -> None:
    eng = Engine.load()  # the embedded SmolLM2-135M; pass a .gguf path for another model
    writer = eng.agent("example-writer", system="You write one short sentence.")
    critic = eng.agent("example-critic", system="You answer with one short critique.")
    turn = len(writer.messages) // 2 + 1
    print(f"turn {turn} (writer holds {writer.tokens} tokens of earlier turns)")

    line = writer.chat(f"Write line {turn} of a poem about the sea.", max_tokens=30)
    print(f"writer: {line}")
    show("writer", writer)

    # hand one agent's output to the other, streamed
    print("critic: ", end="", flush=True)
    for piece in critic.stream(f"Critique this line: {line}", max_tokens=30):
        print(piece, end="", flush=True)
    print()
    show("critic", critic)

    # try a variation without touching the original
    if not eng.has_agent("example-writer-alt"):
        alt = writer.fork("example-writer-alt")
        print(f"fork:   {alt.chat('Now make it rhyme.', max_tokens=30)}")
        show("fork", alt)
        eng.delete_agent("example-writer-alt")

    for info in eng.agents():
        if info.name.startswith("example-"):
            print(
                f"  {info.name}: {info.tokens} tokens, {info.bytes_on_disk / 1024:.0f} KiB on disk"
            )
    eng.flush()  # caches are written in the background; wait before exiting
    print("run me again: both agents continue where they stopped")


if __name__ == "__main__":
    main()
