"""The `edge-infer` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.support import gguf_bytes as g
from tests.support.cli import assert_one_line_error, run_cli


def test_console_script_is_installed():
    exe = shutil.which("edge-infer", path=str(Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "run" in proc.stdout and "models" in proc.stdout


def test_run_streams_an_answer_with_the_default_model():
    proc = run_cli(
        "run", "--temperature", "0", "--max-tokens", "24", "What is the capital of France?"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s" in proc.stderr and "torch/cpu" in proc.stderr


def test_run_raw_completion_from_stdin_with_options():
    proc = run_cli(
        "run",
        "--raw",
        "--backend",
        "torch",
        "--max-tokens",
        "8",
        "--seed",
        "1",
        "--temperature",
        "0.9",
        "--ignore-eos",
        "--no-stats",
        "-",
        stdin="Once upon a time",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert proc.stderr.strip() == ""


def test_run_with_8_bit_kv_cache():
    proc = run_cli("run", "--kv-bits", "8", "--temperature", "0", "--max-tokens", "6", "Hi")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_bad_kv_bits():
    proc = run_cli("run", "--kv-bits", "3", "hi")
    assert_one_line_error(proc, "kv_bits", "4, 8 or 16")


def test_run_mlx_backend():
    pytest.importorskip("mlx_lm")
    proc = run_cli(
        "run",
        "--backend",
        "mlx",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "What is the capital of France?",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "mlx/" in proc.stderr


def test_models_lists_the_default_and_local_files(tmp_path, default_model_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    proc = run_cli("models", "--json", env={"EDGE_INFER_MODELS_DIR": str(folder)})
    assert proc.returncode == 0, proc.stderr
    infos = json.loads(proc.stdout)
    default = infos[0]
    assert default["default"] and default["path"] == str(default_model_path)
    assert (default["arch"], default["quantization"], default["format"]) == (
        "llama",
        "Q4_1",
        "gguf",
    )
    assert default["size_bytes"] == default_model_path.stat().st_size
    assert default["context_length"] == 8192
    broken = next(i for i in infos if i["path"].endswith("broken.gguf"))
    assert broken["error"]
    table = run_cli("models", env={"EDGE_INFER_MODELS_DIR": str(folder)})
    assert table.returncode == 0 and "SmolLM2" in table.stdout and "Q4_1" in table.stdout


def test_one_bad_gguf_does_not_stop_the_models_listing(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    bad = {
        "alignment.gguf": ("general.alignment", g.F32, math.inf),
        "nested.gguf": ("general.tags", g.ARRAY, g.Raw(g.nested_array(200_000))),
        "context.gguf": ("llama.context_length", g.STRING, "long"),
        "markup.gguf": ("general.name", g.STRING, "[/oops] [bold"),
    }
    for name, (key, vtype, value) in bad.items():
        h = g.tiny_llama()
        h.set(key, vtype, value)
        (folder / name).write_bytes(g.to_bytes(h))
    (folder / "[red]odd.gguf").write_bytes(g.to_bytes(g.tiny_llama()))
    env = {"EDGE_INFER_MODELS_DIR": str(folder)}
    proc = run_cli("models", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    infos = {Path(i["path"]).name: i for i in json.loads(proc.stdout)}
    for name in ("alignment.gguf", "nested.gguf", "context.gguf"):
        assert infos[name]["error"] and "\n" not in infos[name]["error"], infos[name]
    assert "general.alignment" in infos["alignment.gguf"]["error"]
    assert "context_length" in infos["context.gguf"]["error"]
    assert infos["markup.gguf"]["name"] == "[/oops] [bold" and not infos["markup.gguf"]["error"]
    table = run_cli("models", env=env)
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    flat = " ".join(table.stdout.split())
    assert "SmolLM2" in flat and "[/oops]" in flat and "[red]odd.gguf" in flat.replace(" ", "")


# -- errors: one line, naming the problem, non-zero exit, no traceback ------------------------


def test_missing_model_path():
    proc = run_cli("run", "--model", "/no/such/model.gguf", "hi")
    assert_one_line_error(proc, "/no/such/model.gguf", "no such file")


def test_truncated_gguf(tmp_path, default_model_path):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src:
        cut.write_bytes(src.read(default_model_path.stat().st_size // 2))
    proc = run_cli("run", "--model", str(cut), "hi")
    assert_one_line_error(proc, str(cut), "truncated")


def test_truncated_gguf_header(tmp_path, default_model_path):
    cut = tmp_path / "head.gguf"
    with open(default_model_path, "rb") as src:
        cut.write_bytes(src.read(4096))
    proc = run_cli("run", "--model", str(cut), "hi")
    assert_one_line_error(proc, str(cut), "truncated")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    proc = run_cli("run", "--model", str(bad), "hi")
    assert_one_line_error(proc, str(bad), "not a GGUF file")


def test_unknown_file_type(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(bytes(64))
    proc = run_cli("run", "--model", str(bad), "hi")
    assert_one_line_error(proc, str(bad), ".gguf")


def _write_gguf(path: Path, arch: str, tensor_type: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:  # declare raw bytes of an unsupported ggml type (e.g. Q2_K = 10: 84 bytes per 256)
        w.add_tensor(
            "token_embd.weight",
            np.zeros((8, 84), dtype=np.uint8),
            raw_shape=(8, 256),
            raw_dtype=gguf.GGMLQuantizationType(tensor_type),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    _write_gguf(path, "falcon")
    proc = run_cli("run", "--model", str(path), "hi")
    assert_one_line_error(proc, str(path), "falcon", "llama", "qwen2")


def test_unsupported_tensor_type(tmp_path):
    from tests.support.model_files import write_tiny_gguf

    path = tmp_path / "q2k.gguf"
    write_tiny_gguf(path, arch="llama", tensor_type="Q2_K")
    proc = run_cli("run", "--model", str(path), "hi")
    assert_one_line_error(proc, str(path), "Q2_K", "Q4_1")


def test_prompt_longer_than_context():
    proc = run_cli("run", "--raw", "-", stdin="word " * 9000)
    assert_one_line_error(proc, "8192")


def test_bad_option_value():
    proc = run_cli("run", "--top-p", "0", "hi")
    assert_one_line_error(proc, "top_p")


def test_unknown_backend():
    proc = run_cli("run", "--backend", "tpu", "hi")
    assert_one_line_error(proc, "tpu", "torch", "mlx")


def test_debug_shows_the_traceback():
    proc = run_cli("--debug", "run", "--model", "/no/such/model.gguf", "hi")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


def test_run_answers_in_json_with_a_schema_file(tmp_path):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    proc = run_cli("run", "--temperature", "0", "--json-schema", str(path), "Name a city.")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"city"}
    path.write_text(json.dumps({"type": "object", "$dynamicRef": "#x"}))
    bad = run_cli("run", "--json-schema", str(path), "Name a city.")
    assert_one_line_error(bad, "$dynamicRef")
    missing = run_cli("run", "--json-schema", str(tmp_path / "nope.json"), "Name a city.")
    assert_one_line_error(missing, "nope.json")


def test_run_with_an_image_on_a_vlm_directory(tmp_path):
    pytest.importorskip("transformers")
    from tests.support.vision_images import synthetic
    from tests.support.vision_models import llava_user_dir

    llava_user_dir(tmp_path / "vlm")
    synthetic(40, 50, seed=1).save(tmp_path / "pic.png")
    args = [
        "run",
        "-m",
        str(tmp_path / "vlm"),
        "-b",
        "torch",
        "--kv-bits",
        "16",
        "--max-tokens",
        "3",
    ]
    proc = run_cli(*args, "--image", str(tmp_path / "pic.png"), "--visual-budget", "0.5", "hi")
    assert proc.returncode == 0, proc.stderr
    assert "image 8/16 tok kept" in proc.stderr


def test_run_with_an_image_on_a_text_model_is_one_line_error(tmp_path):
    from tests.support.vision_images import synthetic

    synthetic(8, 8).save(tmp_path / "pic.png")
    proc = run_cli("run", "--max-tokens", "2", "--image", str(tmp_path / "pic.png"), "hi")
    assert_one_line_error(proc, "text-only model takes no images")


def test_run_with_a_kv_memory_budget():
    proc = run_cli("run", "--kv-memory", "1MB", "--temperature", "0", "--max-tokens", "6", "Hi")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
