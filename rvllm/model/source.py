"""Find a model: an HF directory, a .gguf file, or a preset for dummy weights (`resolve_model`).

Cheap (configs and metadata only), and free of NumPy unless the model is a GGUF file, so the
front-end process calls it for the tokenizer and limits: importing the weight loader there brought
NumPy into a process that has no other use for it (bench/NOTES.md #58). The weights load in the
engine process (loader.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rvllm.errors import ModelLoadError
from rvllm.model.config import PRESETS, ModelSpec, load_hf_config, preset_spec


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf" | "dummy"
    name: str
    spec: ModelSpec
    path: Path | None = None
    generation_config: dict = field(default_factory=dict)
    gguf: object | None = None  # GGUFModel for kind == "gguf"


def resolve_model(model: str | None, load_format: str = "auto", generation_config: str = "auto") -> ModelSource:
    if model is None:
        from rvllm.model.pull import ensure_default_model
        model = str(ensure_default_model())
    if load_format == "dummy":
        if model in PRESETS:
            return ModelSource("dummy", model, preset_spec(model))
        path = Path(model)
        return ModelSource("dummy", path.name, load_hf_config(path), path,
                           _read_generation_config(path, generation_config))
    path = Path(model).expanduser()
    if not path.exists():
        hint = f" (for random weights of a preset: --load-format dummy; presets: {', '.join(PRESETS)})" \
            if model in PRESETS else ""
        raise ModelLoadError(f"{path}: no such file or directory{hint}")
    if path.is_file():
        if path.suffix != ".gguf" and load_format != "gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf; otherwise pass a model directory")
        from rvllm.model.gguf_loader import read_gguf
        g = read_gguf(path)
        gen = dict(g.generation_config) if generation_config == "auto" else {}
        return ModelSource("gguf", path.stem, g.spec, path, gen, g)
    spec = load_hf_config(path)
    return ModelSource("hf", path.name, spec, path, _read_generation_config(path, generation_config))


def _read_generation_config(model_dir: Path, setting: str) -> dict:
    if setting == "vllm":
        return {}
    folder = model_dir if setting == "auto" else Path(setting)
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from None
