"""model_files.generation_defaults against vLLM 0.32's own ModelConfig.get_diff_sampling_param, in
process: the defaults vLLM applies to a request that does not set them, for each way
--generation-config and --override-generation-config can be given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_dp_supervisor.kvcache import model_files
from vllm_dp_supervisor.settings.config import ModelSource

vllm_config = pytest.importorskip("vllm.config")  # vLLM's own, from .venv

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 2,
         "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 300,
         "max_position_embeddings": 512}


def model_dir(path: Path, generation: dict | None) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(LLAMA))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.mark.parametrize(("generation", "source", "override"), [
    ({"max_new_tokens": 7, "presence_penalty": 0.5, "temperature": 0.6, "top_p": 0.9}, None, None),
    ({"max_new_tokens": 7, "frequency_penalty": 0.2}, None, {"max_new_tokens": 3, "top_k": 20}),
    ({"max_new_tokens": 7}, "vllm", {"presence_penalty": 1.0}),
    ({"bos_token_id": 1, "eos_token_id": 2}, None, None),
    (None, None, None),
    ({"max_new_tokens": 7}, "elsewhere", None),
])
def test_generation_defaults_are_vllm_s(tmp_path, generation, source, override):
    model = model_dir(tmp_path / "model", generation)
    if source == "elsewhere":  # --generation-config DIR: that directory's file, not the model's
        source = str(model_dir(tmp_path / "elsewhere", {"max_new_tokens": 11, "presence_penalty": 0.3}))
    ours = model_files.generation_defaults(
        ModelSource(str(model), generation_config=source,
                    override_generation_config=None if override is None else json.dumps(override)), {})
    config = vllm_config.ModelConfig(model=str(model), skip_tokenizer_init=True, generation_config=source or "auto",
                                     override_generation_config=override or {})
    theirs = config.get_diff_sampling_param()
    # vLLM's servers' cap on every request (chat_completion/serving.py, completion/serving.py)
    cap = theirs.get("max_tokens") if config.generation_config not in ("auto", "vllm") else \
        config.override_generation_config.get("max_new_tokens")
    assert ours.pop("override_max_tokens", None) == cap
    assert ours == theirs


def test_unreadable_defaults_say_why(tmp_path):
    with pytest.raises(model_files.ModelFilesError, match="not in the hub cache"):
        model_files.generation_defaults(ModelSource("org/absent"), {"HF_HUB_CACHE": str(tmp_path)})
    bad = model_dir(tmp_path / "bad", None)
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(model_files.ModelFilesError, match=r"generation_config\.json"):
        model_files.generation_defaults(ModelSource(str(bad)), {})
    with pytest.raises(model_files.ModelFilesError, match="--override-generation-config"):
        model_files.generation_defaults(ModelSource(str(model_dir(tmp_path / "m", None)),
                                                    override_generation_config="{oops"), {})
