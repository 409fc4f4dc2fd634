"""The daemon's image parts without a model: URL resolution, keyed prefix ids, request parsing."""

from __future__ import annotations

import base64

import pytest

from edge_infer.server.anthropic import MessagesRequest
from edge_infer.server.images import image_resolver
from edge_infer.server.prefix_pool import keyed_ids
from edge_infer.server.protocol import ChatCompletionRequest
from edge_infer.server.structured import RequestError
from tests.support.vision_images import synthetic
from tests.support.vision_plan import png_data_uri


def test_keyed_ids_tell_images_apart_and_never_match_a_token():
    ids = [5, 6, 9, 9, 9, 7]
    a = keyed_ids(ids, [(2, 5, "key-a")])
    b = keyed_ids(ids, [(2, 5, "key-b")])
    assert a[:2] == b[:2] == [5, 6] and a[5] == b[5] == 7
    assert all(x < 0 for x in a[2:5]) and len(set(a[2:5])) == 3
    assert all(x != y for x, y in zip(a[2:5], b[2:5], strict=True))
    assert keyed_ids(ids, [(2, 5, "key-a")]) == a  # the same image keys alike
    assert keyed_ids(ids, []) == ids


def test_resolver_reads_only_allowed_folders_and_names_the_field(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    synthetic(9, 12).save(allowed / "pic.png")
    synthetic(9, 12).save(tmp_path / "secret.png")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    resolve = image_resolver([allowed], takes_images=True)
    uri = resolve(str(allowed / "pic.png"), "f")
    assert uri == png_data_uri(synthetic(9, 12)) == resolve(uri, "f")
    assert resolve(f"file://{allowed}/pic.png", "f") == uri
    for bad in (str(tmp_path / "secret.png"), str(allowed / "link.png"), "http://x/y.png"):
        with pytest.raises(RequestError) as exc:
            resolve(bad, "messages[0].content[1].image_url")
        assert exc.value.param == "messages[0].content[1].image_url"
        assert str(exc.value).startswith("messages[0].content[1].image_url: ")
    with pytest.raises(RequestError, match="--image-folder"):
        image_resolver([], takes_images=True)(str(allowed / "pic.png"), "f")
    with pytest.raises(RequestError, match="text only"):
        image_resolver([allowed], takes_images=False)(uri, "f")
    raw = base64.b64decode(uri.partition(",")[2])
    truncated = base64.b64encode(raw[: len(raw) // 2]).decode()  # a PNG cut short
    with pytest.raises(RequestError, match="not an image this server can read"):
        resolve("data:image/png;base64," + truncated, "f")


def test_openai_image_parts_keep_their_order_and_other_parts_are_refused():
    uri = png_data_uri(synthetic(4, 4))
    req = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "plain"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": uri, "detail": "low"}},
                ],
            },
        ]
    )
    resolve = image_resolver([], takes_images=True)
    plain, mixed = req.message_dicts(resolve)
    assert plain["content"] == "plain"
    assert mixed["content"] == [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": uri}},
    ]
    with pytest.raises(ValueError, match="not supported"):
        req.message_dicts()  # where images are not taken (apply-template)
    audio = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    )
    with pytest.raises(RequestError) as exc:
        audio.message_dicts(resolve)
    assert exc.value.param == "messages[0].content[0]"


def test_anthropic_image_blocks_become_image_url_parts():
    uri = png_data_uri(synthetic(4, 4))
    data = uri.partition(",")[2]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    req = MessagesRequest(
        max_tokens=4,
        system="sys",
        messages=[{"role": "user", "content": [{"type": "text", "text": "see "}, image]}],
    )
    out = req.chat_messages(image_resolver([], takes_images=True))
    assert out == [
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "see "},
                {"type": "image_url", "image_url": {"url": uri}},
            ],
        },
    ]
    with pytest.raises(RequestError) as exc:
        req.chat_messages()
    assert exc.value.param == "messages[0].content[1].source"
