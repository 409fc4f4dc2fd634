"""Loading Hugging Face (fp16 / bf16) and MLX 4-bit model directories."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_infer.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.hf.loader import load_hf_dir
from edge_infer.models.loader import load_model
from edge_infer.models.spec import LoadedModel
from tests.support.model_files import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    SPECIAL_TOKENS,
    assert_backends_agree,
    write_tiny_hf_dir,
)

pytest.importorskip("safetensors")

IDS = np.array([BOS_ID, 40, 75, 259, 262, 100, 200, EOS_ID])


def llama3_inv_freq(inv_freq: np.ndarray, factor: float, low: float, high: float, old: float):
    """Llama 3 rope scaling as written in transformers (piecewise, not clipped)."""
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def assert_quantized_on_load(w: object, ref: np.ndarray, name: str) -> None:
    """4-bit group-64 weight within one quantization step (+ float16 slack) of ``ref``."""
    assert isinstance(w, QuantizedWeight), name
    assert (w.bits, w.group_size, w.shape) == (4, 64, ref.shape), name
    g = ref.reshape(ref.shape[0], -1, 64)
    step = (g.max(-1) - g.min(-1)) / 15 + 2.0**-9 * np.abs(g).max(-1)
    err = np.abs(w.dequantize() - ref).reshape(g.shape)
    assert np.all(err <= step[..., None]), name
    assert err.mean() <= 0.4 * step.mean(), name


# ---------------------------------------------------------------------- fp16 / bf16


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def float_case(request, tmp_path_factory) -> tuple[dict, LoadedModel]:
    path = tmp_path_factory.mktemp(request.param)
    info = write_tiny_hf_dir(path, "llama", request.param, rope_theta=20000.0, shards=2)
    return info, load_model(path)


def test_float_config(float_case) -> None:
    info, model = float_case
    cfg, raw = model.config, info["config"]
    assert cfg.arch == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (268, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.rope_theta, cfg.context_length, cfg.rms_norm_eps) == (20000.0, 512, 1e-5)
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False
    assert cfg.rope_freq_factors is None
    assert raw["torch_dtype"] in ("float16", "bfloat16")
    assert model.quantization == "4-bit (quantized on load)"
    assert model.name == info["path"].name


def test_float_weights_quantized_on_load(float_case) -> None:
    info, model = float_case
    assert set(model.weights) == set(info["weights"])
    for name, ref in info["weights"].items():
        if ref.ndim == 1:
            w = model.weights[name]
            assert isinstance(w, np.ndarray) and w.dtype == np.float32
            np.testing.assert_array_equal(w, ref, err_msg=name)
        else:
            assert_quantized_on_load(model.weights[name], ref, name)


def test_float_backends_agree(float_case) -> None:
    assert_backends_agree(float_case[1], IDS)


def test_bf16_values_read_exactly(tmp_path: Path) -> None:
    """bf16 norms (not quantized) come back bit-exact, and differ from a float16 reading."""
    info = write_tiny_hf_dir(tmp_path, "llama", "bfloat16", seed=4)
    model = load_model(tmp_path)
    norm = model.weights["model.norm.weight"]
    np.testing.assert_array_equal(norm, info["weights"]["model.norm.weight"])
    assert np.all(norm.view(np.uint32) & 0xFFFF == 0)  # bf16 bit patterns, widened
    assert np.abs(norm - 1).max() < 1  # plausible values, not garbage from a wrong dtype


# ---------------------------------------------------------------------- config mapping


def test_mistral_maps_to_llama(tmp_path: Path) -> None:
    write_tiny_hf_dir(tmp_path, "mistral", "float16")
    model = load_model(tmp_path)
    assert model.config.arch == "llama"
    assert model.config.attention_bias is False


def test_qwen2_biases_and_tied_embeddings(tmp_path: Path) -> None:
    info = write_tiny_hf_dir(
        tmp_path, "qwen2", "bfloat16", tie_word_embeddings=True, rope_theta=1e6
    )
    model = load_model(tmp_path)
    cfg = model.config
    assert (cfg.arch, cfg.attention_bias, cfg.tie_word_embeddings) == ("qwen2", True, True)
    assert "lm_head.weight" not in model.weights
    for i in range(cfg.num_layers):
        for proj in "qkv":
            name = f"model.layers.{i}.self_attn.{proj}_proj.bias"
            assert model.weights[name].dtype == np.float32
            np.testing.assert_array_equal(model.weights[name], info["weights"][name])
    assert_backends_agree(model, IDS)


def test_missing_lm_head_means_tied(tmp_path: Path) -> None:
    write_tiny_hf_dir(tmp_path, "llama", "float16", skip=["lm_head.weight"])
    model = load_model(tmp_path)
    assert model.config.tie_word_embeddings is True
    assert_backends_agree(model, IDS)


def test_llama3_rope_scaling(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    write_tiny_hf_dir(tmp_path, "llama", "float16", rope_theta=500000.0, rope_scaling=scaling)
    model = load_model(tmp_path)
    inv = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    want = inv / llama3_inv_freq(inv, 8.0, 1.0, 4.0, 8192.0)
    factors = np.array(model.config.rope_freq_factors)
    np.testing.assert_allclose(factors, want, rtol=1e-12)
    # this head_dim / theta reaches all three bands: unscaled, smoothed and divided by 8
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert np.any((factors > 1.001) & (factors < 7.999))
    np.testing.assert_allclose(model.config.rope_inv_freq(), inv / want, rtol=1e-12)
    assert_backends_agree(model, IDS)


def test_linear_rope_scaling(tmp_path: Path) -> None:
    write_tiny_hf_dir(tmp_path, "llama", "float16", rope_scaling={"type": "linear", "factor": 2.0})
    assert load_model(tmp_path).config.rope_freq_factors == (2.0,) * 8


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_and_chat_template(float_case) -> None:
    tok = float_case[1].tokenizer
    assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID)
    assert {0, EOS_ID} <= tok.eos_ids
    assert tok.add_bos is False
    assert tok.chat_template == CHATML_TEMPLATE
    for i, text in enumerate(SPECIAL_TOKENS):
        assert tok.encode(text) == [i]
    assert tok.encode("hello world") == [tok.token_to_id("hello"), tok.token_to_id("Ġworld")]
    for text in ("hello world", "Héllo, wörld! 123 ✓\n", "<|im_start|>user\nhi<|im_end|>\n"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special=True) == "hi"


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    write_tiny_hf_dir(tmp_path, "llama", "float16")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_model(tmp_path).tokenizer.chat_template == "{{ messages[0]['content'] }}"


# ---------------------------------------------------------------------- MLX 4-bit


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def mlx_case(request, tmp_path_factory) -> tuple[dict, LoadedModel]:
    path = tmp_path_factory.mktemp(f"mlx4-{request.param}")
    info = write_tiny_hf_dir(path, request.param, "mlx4")
    return info, load_model(path)


def test_mlx4_weights_bit_identical(mlx_case) -> None:
    info, model = mlx_case
    assert model.quantization == "MLX 4-bit"
    assert set(model.weights) == set(info["weights"])
    for name, qw in info["quantized"].items():
        w = model.weights[name]
        assert isinstance(w, QuantizedWeight), name
        assert (w.bits, w.group_size) == (4, 64)
        for field in ("packed", "scales", "biases"):
            got, want = getattr(w, field), getattr(qw, field)
            assert got.dtype == want.dtype, (name, field)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}.{field}")
    for name, ref in info["weights"].items():
        if ref.ndim == 1:
            np.testing.assert_array_equal(model.weights[name], ref, err_msg=name)


def test_mlx4_backends_agree(mlx_case) -> None:
    assert_backends_agree(mlx_case[1], IDS)


def test_mlx4_per_layer_quantization(tmp_path: Path) -> None:
    """A per-module entry in "quantization" overrides the global bits / group size."""
    from safetensors.numpy import load_file, save_file

    from edge_infer.formats.affine import quantize

    info = write_tiny_hf_dir(tmp_path, "llama", "mlx4")
    cfg = info["config"]
    cfg["quantization"]["model.layers.0.mlp.down_proj"] = {"bits": 8, "group_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    qw = quantize(info["weights"]["model.layers.0.mlp.down_proj.weight"], bits=8, group_size=32)
    base = "model.layers.0.mlp.down_proj"
    tensors[f"{base}.weight"], tensors[f"{base}.scales"], tensors[f"{base}.biases"] = (
        qw.packed,
        qw.scales,
        qw.biases,
    )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    w = load_model(tmp_path).weights[f"{base}.weight"]
    assert (w.bits, w.group_size) == (8, 32)
    np.testing.assert_array_equal(w.packed, qw.packed)


# ---------------------------------------------------------------------- errors


@pytest.fixture
def good_dir(tmp_path: Path) -> Path:
    write_tiny_hf_dir(tmp_path / "m", "llama", "float16")
    return tmp_path / "m"


def test_no_config(good_dir: Path) -> None:
    (good_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json") as exc:
        load_model(good_dir)
    assert str(good_dir) in str(exc.value)


def test_bad_config_json(good_dir: Path) -> None:
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(good_dir)


def test_config_missing_key(good_dir: Path) -> None:
    cfg = json.loads((good_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="hidden_size"):
        load_model(good_dir)


def test_unsupported_model_type(good_dir: Path) -> None:
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(good_dir)
    msg = str(exc.value)
    assert "'gpt_neox'" in msg and all(a in msg for a in ("llama", "mistral", "qwen2"))


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    write_tiny_hf_dir(
        tmp_path, "llama", "float16", rope_scaling={"rope_type": "yarn", "factor": 4.0}
    )
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        load_model(tmp_path)


def test_no_safetensors(good_dir: Path) -> None:
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no .safetensors"):
        load_model(good_dir)


def test_no_tokenizer(good_dir: Path) -> None:
    (good_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer"):
        load_model(good_dir)


def test_missing_tensor(tmp_path: Path) -> None:
    write_tiny_hf_dir(tmp_path, "llama", "float16", skip=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ModelFormatError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        load_model(tmp_path)


def test_packed_without_quantization_config(tmp_path: Path) -> None:
    info = write_tiny_hf_dir(tmp_path, "llama", "mlx4")
    cfg = dict(info["config"])
    del cfg["quantization"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="packed but has no quantization settings"):
        load_model(tmp_path)


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the header's opening "{"
    path.write_bytes(bytes(data))


def _huge_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])


def _cut_data(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _too_short(path: Path) -> None:
    path.write_bytes(b"\x01\x02")


@pytest.mark.parametrize(
    "damage,message",
    [
        (_corrupt_header, "corrupt safetensors header"),
        (_huge_header_length, "truncated or corrupt safetensors header"),
        (_cut_data, "truncated file"),
        (_too_short, "not a safetensors file"),
    ],
)
def test_damaged_safetensors(good_dir: Path, damage, message: str) -> None:
    path = good_dir / "model.safetensors"
    damage(path)
    with pytest.raises(ModelFormatError, match=message) as exc:
        load_model(good_dir)
    assert str(path) in str(exc.value)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + n]))
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])


def _set(name: str, key: str, value):
    def edit(header: dict) -> dict:
        header[name][key] = value
        return header

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set("model.norm.weight", "dtype", "F8_E4M3"), id="unknown-dtype"),
        pytest.param(_set("model.norm.weight", "data_offsets", [0, 1 << 40]), id="offset-past-end"),
        pytest.param(_set("model.norm.weight", "shape", [65]), id="shape-vs-offsets"),
        pytest.param(
            _set("model.embed_tokens.weight", "shape", [268, 65]), id="matrix-shape-vs-offsets"
        ),
        pytest.param(_set("model.norm.weight", "data_offsets", [10, 5]), id="reversed-offsets"),
        pytest.param(
            lambda h: {
                k: {kk: vv for kk, vv in v.items() if kk != "data_offsets"} for k, v in h.items()
            },
            id="no-data-offsets",
        ),
        pytest.param(lambda h: [1, 2], id="header-not-object"),
    ],
)
def test_inconsistent_safetensors_header(good_dir: Path, edit) -> None:
    path = good_dir / "model.safetensors"
    _rewrite_header(path, edit)
    with pytest.raises(ModelFormatError) as exc:
        load_model(good_dir)
    assert str(path) in str(exc.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "nope")


# ---------------------------------------------------------------------- VLM directories

VLM_LAYOUTS = {
    # transformers 4.x LLaVA (and what 5.x's save_pretrained still writes for LLaVA)
    "llava-4.x": (
        "llava",
        {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
        "vision_tower.vision_model.post_layernorm.weight",
    ),
    "llava-5.x": (
        "llava",
        {"model.": "model.language_model.", "lm_head.": "lm_head."},
        "model.vision_tower.post_layernorm.weight",
    ),
    "idefics3": (
        "idefics3",
        {"model.": "model.text_model.", "lm_head.": "lm_head."},
        "model.vision_model.post_layernorm.weight",
    ),
}


@pytest.mark.parametrize("layout", sorted(VLM_LAYOUTS))
def test_vlm_directory_loads_its_text_model(tmp_path, layout):
    """A VLM keeps the text model's settings in text_config and its weights under a prefix
    that depends on the architecture and transformers' version; the image side is left out."""
    from safetensors.numpy import load_file, save_file

    model_type, prefixes, vision_name = VLM_LAYOUTS[layout]
    info = write_tiny_hf_dir(tmp_path / "text", "llama", "float16", rope_theta=20000.0)
    text = load_hf_dir(tmp_path / "text", bits=16)
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    renamed = {}
    for name, arr in load_file(str(tmp_path / "text" / "model.safetensors")).items():
        old = "lm_head." if name.startswith("lm_head.") else "model."
        renamed[prefixes[old] + name[len(old) :]] = arr
    renamed[vision_name] = np.ones(8, dtype=np.float16)
    save_file(renamed, str(vlm / "model.safetensors"))
    inner = dict(info["config"])
    theta = inner.pop("rope_theta")
    inner["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}  # transformers 5
    config = {
        "model_type": model_type,
        "text_config": inner,
        "vision_config": {"hidden_size": 8},
    }
    (vlm / "config.json").write_text(json.dumps(config))
    for f in (tmp_path / "text").iterdir():
        if f.name.startswith("tokenizer"):
            (vlm / f.name).write_bytes(f.read_bytes())
    template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    (vlm / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    got = load_hf_dir(vlm, bits=16)
    assert got.config == text.config and got.config.rope_theta == 20000.0
    assert sorted(got.weights) == sorted(text.weights)
    for name, w in text.weights.items():
        np.testing.assert_array_equal(got.weights[name], w, err_msg=name)
    assert got.tokenizer.encode("hello world") == text.tokenizer.encode("hello world")
    assert got.tokenizer.chat_template == template


def test_vlm_text_config_falls_back_to_transformers_defaults(tmp_path):
    """LLaVA-1.5's hub config lists only what differs from LlamaConfig's defaults."""
    from edge_infer.models.hf.loader import config_from_hf, text_config

    raw = {
        "model_type": "llava",
        "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5},
        "tie_word_embeddings": False,
    }
    cfg = config_from_hf(text_config(raw), tmp_path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (4096, 11008, 32)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (32, 32, 32064)
    assert not cfg.tie_word_embeddings
