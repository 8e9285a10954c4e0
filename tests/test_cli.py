"""The command line: help, version, generate, and one-line errors (no traceback, non-zero exit)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rvllm import __version__
from tests.tiny_models import write_model


def rvllm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rvllm", *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_version():
    out = rvllm("--help")
    assert out.returncode == 0
    for command in ("serve", "generate", "chat", "pull"):
        assert command in out.stdout
    out = rvllm("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_generate_prints_the_completion(smollm2_path):
    out = rvllm("generate", "The capital of France is", "--model", str(smollm2_path), "--max-tokens", "4",
                "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def _assert_one_line_error(out, *fragments):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("rvllm: error:")]
    assert len(errors) == 1, out.stderr
    for f in fragments:
        assert f in errors[0]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_bad_models_are_one_line_errors(tmp_path, command):
    args = ["hi"] if command == "generate" else ["--port", "0"]
    _assert_one_line_error(rvllm(command, *args, "--model", str(tmp_path / "missing")), "missing", "no such file")
    d, cfg, _ = write_model(tmp_path, "llama")
    (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["FalconForCausalLM"])))
    _assert_one_line_error(rvllm(command, *args, "--model", str(d)), "FalconForCausalLM", "LlamaForCausalLM")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    _assert_one_line_error(rvllm(command, *args, "--model", str(bad)), "bad.gguf")


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    from rvllm.backend.cuda_probe import cuda_available

    if cuda_available()[0]:
        pytest.skip("this machine has a GPU")
    d, _, _ = write_model(tmp_path, "llama")
    _assert_one_line_error(rvllm("generate", "hi", "--model", str(d), "--device", "cuda"), "--device cuda")


def test_chat_keeps_history_and_exits(smollm2_path):
    """`rvllm chat` on stdin: two turns, /history shows both with the first answer, /exit leaves."""
    proc = subprocess.run([sys.executable, "-m", "rvllm", "chat", "--model", str(smollm2_path), "--device", "cpu",
                           "--temperature", "0", "--max-tokens", "24", "--system", "Be brief."],
                          input="What is the capital of France?\nAnd of Italy?\n/history\n/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Paris" in out.split("[system]")[0]  # the first reply, before the history listing
    history = out[out.index("[system]"):].splitlines()
    assert history[0] == "[system] Be brief."
    assert history[1] == "[user] What is the capital of France?"
    assert history[2].startswith("[assistant]") and "Paris" in history[2]
    assert history[3] == "[user] And of Italy?"
    assert history[4].startswith("[assistant]")
