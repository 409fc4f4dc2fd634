"""Talk to a running `edge-infer serve` with the official openai client.

edge-infer serve &                      # http://127.0.0.1:8741/v1
.venv/bin/python examples/openai_client.py
"""

from __future__ import annotations

import os

import openai

client = openai.OpenAI(
    base_url=os.environ.get("EDGE_INFER_URL", "http://127.0.0.1:8741/v1"),
    api_key=os.environ.get("EDGE_INFER_API_KEY", "not-needed-on-loopback"),
)

# stateless, streamed
stream = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Give me a haiku about memory."}],
    max_tokens=60,
    stream=True,
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# an agent: the server keeps the conversation and its KV cache; send only the new message
for question in ("My project is called Nimbus.", "What is my project called?"):
    r = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": question}],
        max_tokens=40,
        extra_body={"agent": "example-assistant"},
    )
    cached = r.usage.prompt_tokens_details.cached_tokens
    print(f"> {question}\n{r.choices[0].message.content}")
    print(f"  [prompt {r.usage.prompt_tokens} tokens, {cached} reused from the agent's cache]")
