"""`edge-infer serve` with a VLM: images through the OpenAI and Anthropic clients, the image
tokens usage counts, field-named 400s, tools beside images, and KV (stateless, an agent's or a
prompt_cache_key's) reused only for the same image."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

pytest.importorskip("transformers")

from tests.support.server_process import running_server  # noqa: E402
from tests.support.vision_images import synthetic  # noqa: E402
from tests.support.vision_models import llava_user_dir  # noqa: E402
from tests.support.vision_plan import kept_tokens, png_data_uri  # noqa: E402

pytestmark = pytest.mark.slow

BUDGET = 0.5  # the server's --visual-budget
GREEDY = {"temperature": 0, "max_tokens": 3}
FIELD = "messages[1].content[0].image_url"  # the image part of ask()'s messages


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-server")
    llava_user_dir(root / "vlm")
    allowed = root / "allowed"
    allowed.mkdir()
    synthetic(41, 57, seed=9).save(allowed / "pic.png")
    synthetic(41, 57, seed=3).save(root / "outside.png")
    (allowed / "link.png").symlink_to(root / "outside.png")
    (allowed / "junk.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def server(files):
    args = ["--model", str(files / "vlm"), "--kv-bits", "16", "--visual-budget", str(BUDGET)]
    with running_server(files / "cache", *args, "--image-folder", str(files / "allowed")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask(url: str, text: str = "what is it?") -> list[dict]:
    return [
        {"role": "system", "content": "Look closely."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        },
    ]


def details(response) -> dict:
    return response.usage.model_dump()["prompt_tokens_details"]


def post(server, messages, **body) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": messages, **GREEDY, **body},
        timeout=120,
    )


def test_an_image_data_uri_is_answered_and_usage_counts_the_kept_tokens(files, client):
    img = synthetic(41, 57, seed=9)
    kept, total = kept_tokens(files / "vlm", img, "hired", BUDGET)
    assert kept < total
    assert kept != kept_tokens(files / "vlm", img, "hired", 0.2)[0]  # the flag matters
    r = client.chat.completions.create(model="m", messages=ask(png_data_uri(img)), **GREEDY)
    assert r.choices[0].message.content is not None
    assert details(r)["image_tokens"] == kept and details(r)["image_tokens_total"] == total
    # the request's own budget: prompt_tokens counts text plus the image tokens kept
    full = client.chat.completions.create(
        model="m",
        messages=ask(png_data_uri(img)),
        extra_body={"visual_budget": 1.0, "visual_method": "full"},
        **GREEDY,
    )
    assert details(full)["image_tokens"] == total
    assert full.usage.prompt_tokens - r.usage.prompt_tokens == total - kept
    uniform = client.chat.completions.create(
        model="m", messages=ask(png_data_uri(img)), extra_body={"visual_budget": 0.25}, **GREEDY
    )
    assert details(uniform)["image_tokens"] == kept_tokens(files / "vlm", img, "hired", 0.25)[0]


def test_a_file_in_an_allowed_folder_reads_as_its_data_uri(files, server):
    pic = files / "allowed" / "pic.png"
    by_path = post(server, ask(f"file://{pic}"))
    assert by_path.status_code == 200, by_path.text
    plain = post(server, ask(str(pic)))
    assert plain.status_code == 200, plain.text
    uri = post(server, ask(png_data_uri(synthetic(41, 57, seed=9))))
    assert by_path.json()["choices"] == plain.json()["choices"] == uri.json()["choices"]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,not*base64!", "base64"),
        ("data:image/png," + "x" * 20, "base64"),
        ("data:image/png;base64," + base64.b64encode(b"no image here").decode(), "not an image"),
        ("https://example.com/cat.png", "remote"),
        ("cat.png", "data: URI or an absolute"),
        ("{root}/outside.png", "outside the folders"),
        ("{root}/allowed/link.png", "outside the folders"),  # a symlink out of the folder
        ("file://{root}/allowed/../outside.png", "outside the folders"),
        ("{root}/allowed/missing.png", "no such image file"),
        ("{root}/allowed/junk.png", "not an image"),
    ],
)
def test_bad_images_are_400s_naming_the_field(files, server, url, fragment):
    resp = post(server, ask(url.format(root=files)))
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == FIELD and FIELD in err["message"] and fragment in err["message"], err
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_different_image_does_not_reuse_the_first_ones_kv(server):
    first, other = synthetic(41, 57, seed=21), synthetic(41, 57, seed=22)
    a = post(server, ask(png_data_uri(first), "and so?")).json()["usage"]
    again = post(server, ask(png_data_uri(first), "and so?")).json()["usage"]
    b = post(server, ask(png_data_uri(other), "and so?")).json()["usage"]
    assert a["prompt_tokens"] == again["prompt_tokens"] == b["prompt_tokens"]
    image = a["prompt_tokens_details"]["image_tokens"]
    # the same image: all but the last prompt token from the cache
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
    # another image with the same placeholder ids: nothing from the first image's span on
    prefix = b["prompt_tokens"] - image
    assert b["prompt_tokens_details"]["cached_tokens"] < prefix


def test_an_agent_keeps_the_image_and_reads_it_from_its_cache(files, client, server):
    agent = {"X-Agent-ID": "seer"}
    img = png_data_uri(synthetic(30, 30, seed=5))
    one = client.chat.completions.create(
        model="m", messages=ask(img), extra_headers=agent, **GREEDY
    )
    history = ask(img) + [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "and then?"},
    ]
    two = client.chat.completions.create(model="m", messages=history, extra_headers=agent, **GREEDY)
    assert details(two)["cached_tokens"] >= one.usage.prompt_tokens
    assert details(two)["image_tokens"] == details(one)["image_tokens"] > 0
    stored = httpx.get(f"{server.url}/v1/agents/seer").json()["conversation"]
    parts = [m for m in stored if isinstance(m["content"], list)][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    # a request budget would not apply to the agent's stored images: refused, not ignored
    resp = post(server, ask(img), visual_budget=0.9, agent="seer")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "visual_budget"


LOOK = {
    "type": "function",
    "function": {
        "name": "look",
        "description": "Look closer at one half of the picture.",
        "parameters": {
            "type": "object",
            "properties": {"half": {"enum": ["top", "bottom"]}},
            "required": ["half"],
            "additionalProperties": False,
        },
    },
}
CALL = {"tools": [LOOK], "tool_choice": "required", "parallel_tool_calls": False}


def text_only(messages: list[dict]) -> list[dict]:
    """``messages`` without their image parts."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = {**m, "content": "".join(p.get("text", "") for p in m["content"])}
        out.append(m)
    return out


def the_call(response) -> dict:
    assert response.choices[0].finish_reason == "tool_calls"
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "look"
    return json.loads(call.function.arguments)


def test_tools_with_an_image_are_in_the_prompt_and_calls_are_parsed(client):
    img = png_data_uri(synthetic(41, 57, seed=9))
    kw = dict(model="m", temperature=0, max_tokens=120)
    plain = client.chat.completions.create(messages=ask(img), **kw)
    r = client.chat.completions.create(messages=ask(img), **CALL, **kw)
    assert the_call(r)["half"] in ("top", "bottom")
    assert details(r)["image_tokens"] == details(plain)["image_tokens"] > 0
    # the tools take as many prompt tokens with an image as without one
    text = text_only(ask(img))
    bare = client.chat.completions.create(messages=text, **kw)
    tooled = client.chat.completions.create(messages=text, **CALL, **kw)
    assert r.usage.prompt_tokens - plain.usage.prompt_tokens > 0
    assert r.usage.prompt_tokens - plain.usage.prompt_tokens == (
        tooled.usage.prompt_tokens - bare.usage.prompt_tokens
    )
    # streamed, and on an agent's turn, the call comes back parsed alike
    with client.chat.completions.stream(messages=ask(img), **CALL, **kw) as stream:
        final = stream.get_final_completion()
    assert the_call(final) == the_call(r)
    agent = client.chat.completions.create(
        messages=ask(img), extra_headers={"X-Agent-ID": "looker"}, **CALL, **kw
    )
    assert the_call(agent) == the_call(r)


def test_prompt_cache_key_with_images_reuses_only_the_same_image(client):
    first, other = synthetic(41, 57, seed=31), synthetic(41, 57, seed=32)

    def send(img, key: str = "pics"):
        return client.chat.completions.create(
            model="m",
            messages=ask(png_data_uri(img), "and so?"),
            extra_body={"prompt_cache_key": key},
            **GREEDY,
        )

    a = send(first)
    assert details(a)["cached_tokens"] == 0 and details(a)["image_tokens"] > 0
    again = send(first)
    assert again.usage.prompt_tokens == a.usage.prompt_tokens
    assert details(again)["cached_tokens"] == again.usage.prompt_tokens - 1  # all but the last
    assert again.choices[0].message.content == a.choices[0].message.content
    # another image with the same placeholder ids: nothing from the image's span on
    b = send(other)
    prefix = b.usage.prompt_tokens - details(b)["image_tokens"]
    assert 0 < details(b)["cached_tokens"] < prefix
    assert details(send(first))["cached_tokens"] < prefix  # the cache now holds the other one
    assert details(send(first, "elsewhere"))["cached_tokens"] == 0  # a key has its own cache


def test_anthropic_messages_take_base64_image_blocks(files, server):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    img = synthetic(41, 57, seed=9)
    data = png_data_uri(img).partition(",")[2]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]
    r = client.messages.create(model="m", max_tokens=3, messages=messages)
    usage = r.usage.model_dump()
    assert usage["image_tokens"] == kept_tokens(files / "vlm", img, "hired", BUDGET)[0]
    counted = client.messages.count_tokens(model="m", messages=messages)
    assert counted.input_tokens == usage["input_tokens"] + usage["cache_read_input_tokens"]
    bad = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "!!"}}
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(
            model="m",
            max_tokens=3,
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, bad]}],
        )
    assert "messages[0].content[1].source" in str(exc.value) and "base64" in str(exc.value)
    remote = {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}
    with pytest.raises(anthropic.BadRequestError, match="remote"):
        client.messages.create(
            model="m", max_tokens=3, messages=[{"role": "user", "content": [remote]}]
        )
