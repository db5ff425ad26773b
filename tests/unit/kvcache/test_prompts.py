"""prompts.py, template.py, model_files.py: a request's tokens as the engine will see them, from the
model's own files (here the stand-in's byte-level tokenizer, built by standin_tokenizer.py; the
real-vLLM test checks a real model's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import standin_model
import standin_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_dp_supervisor.kvcache import model_files
from vllm_dp_supervisor.kvcache.prompts import LONGEST_PIECE, PromptError, PromptReader
from vllm_dp_supervisor.settings.config import ModelSource


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> PromptReader:
    directory = standin_tokenizer.build(tmp_path_factory.mktemp("standin-model"))
    return PromptReader(model_files.find(ModelSource(str(directory)), {}), piece_chars=8)


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=40)}), min_size=1, max_size=4)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages)
def test_a_chat_is_read_as_the_stand_in_reads_it(reader, msgs):
    assert reader.token_ids(reader.text("/v1/chat/completions", {"messages": msgs})) == \
        standin_model.chat_prompt(msgs)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_a_completion_gets_the_tokenizer_s_special_tokens_and_token_ids_are_taken_as_they_are(reader, text):
    assert reader.token_ids(reader.text("/v1/completions", {"prompt": text})) == standin_model.completion_prompt(text)
    assert reader.text("/v1/completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]


def test_text_parts_are_joined_by_newlines_and_a_developer_becomes_a_system_message(reader):
    msgs = [{"role": "developer", "content": "d"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                               {"type": "text", "text": "b"}]}]
    assert reader.token_ids(reader.text("/v1/chat/completions", {"messages": msgs})) == \
        standin_model.chat_prompt([{"role": "system", "content": "d"}, {"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize("request_body", [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "cache_salt": "tenant-a"},
    {"messages": []}, {"messages": ["not an object"]}, {"prompt": None}, {"prompt": [1, "x"]},
    {"prompt": "x", "prompt_embeds": "AAAA"},
])
def test_what_it_cannot_read_as_vllm_would_is_a_prompt_error(reader, request_body):
    path = "/v1/chat/completions" if "messages" in request_body else "/v1/completions"
    with pytest.raises(PromptError):
        reader.text(path, request_body)


def test_a_template_that_raises_is_a_prompt_error(tmp_path):
    directory = standin_tokenizer.build(tmp_path)
    refusing = "{{ raise_exception('roles must alternate') }}"
    reader = PromptReader(model_files.find(ModelSource(str(directory), chat_template=refusing), {}))
    with pytest.raises(PromptError, match="roles must alternate"):
        reader.text("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})


def test_a_continued_final_message_ends_the_prompt_there(reader):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial answ"}]
    text, _ = reader.text("/v1/chat/completions", {"messages": msgs, "continue_final_message": True,
                                                   "add_generation_prompt": False})
    assert text.endswith("partial answ")


def test_a_hub_id_is_found_in_the_hub_cache_at_its_revision_and_never_downloaded(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / ("a" * 40)
    standin_tokenizer.build(snapshot)
    (tmp_path / "hub" / "models--org--m" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--m" / "refs" / "main").write_text("a" * 40)
    assert model_files.find(ModelSource("org/m"), {"HF_HOME": str(tmp_path)}).directory == snapshot
    assert model_files.find(ModelSource("org/m", revision="a" * 40), {"HF_HUB_CACHE": str(tmp_path / "hub")})
    with pytest.raises(model_files.ModelFilesError, match="not in the hub cache"):
        model_files.find(ModelSource("org/other"), {"HF_HOME": str(tmp_path)})
    with pytest.raises(model_files.ModelFilesError, match="not a directory"):
        model_files.find(ModelSource("no/such/path"), {})


def test_the_chat_template_comes_from_the_flag_then_its_file_then_the_config(tmp_path):
    directory = standin_tokenizer.build(tmp_path / "m")
    assert model_files.find(ModelSource(str(directory)), {}).template(False) == standin_tokenizer.CHAT_TEMPLATE
    (directory / "chat_template.jinja").write_text("from the file")
    assert model_files.find(ModelSource(str(directory)), {}).template(False) == "from the file"
    flag_file = tmp_path / "t.jinja"
    flag_file.write_text("from the flag's file")
    assert model_files.find(ModelSource(str(directory), chat_template=str(flag_file)), {}).template(False) == \
        "from the flag's file"
    assert model_files.find(ModelSource(str(directory), chat_template="{{ x }}"), {}).template(False) == "{{ x }}"
    with pytest.raises(model_files.ModelFilesError, match="no such file"):
        model_files.find(ModelSource(str(directory), chat_template="missing.jinja"), {})
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "d"}, {"name": "tool_use", "template": "t"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    files = model_files.find(ModelSource(str(directory)), {})
    assert (files.template(False), files.template(True)) == ("d", "t")


def test_a_model_without_a_fast_tokenizer_file_is_said_so(tmp_path):
    with pytest.raises(model_files.ModelFilesError, match=r"no tokenizer\.json"):
        model_files.find(ModelSource(str(tmp_path)), {})


def test_pieces_are_cut_only_where_the_whole_text_would_split_and_are_kept(reader):
    text = "one two  three\nfour five six seven"
    pieces = list(reader._cut(text, 8))
    assert "".join(pieces) == text and all(p.startswith(" ") for p in pieces[1:])
    first = reader.token_ids((text, False))
    assert reader.token_ids((text, False)) == first == list(text.encode())


def test_a_tokenizer_whose_pieces_would_differ_is_read_whole(tmp_path):
    directory = standin_tokenizer.build(tmp_path)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Prepend", "prepend": "_"}  # as a SentencePiece model's: per piece
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    reader = PromptReader(model_files.find(ModelSource(str(directory)), {}))
    assert not reader.in_pieces
    assert reader.token_ids(("a b", False)) == list(b"_a b")


def test_a_broken_tokenizer_config_is_said_so(tmp_path: Path):
    directory = standin_tokenizer.build(tmp_path)
    (directory / "tokenizer_config.json").write_text("not json")
    with pytest.raises(model_files.ModelFilesError, match=r"tokenizer_config\.json"):
        model_files.find(ModelSource(str(directory)), {})


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["東京は日本の首都です。人口が多い！大阪、京都、名古屋…「引用」。北京是中国的首都，人口众多。",
          '{"key":"value","list":[1,2,3],"nested":{"naïve":"café","emoji":"😀👍🏽"}}',
          "Hello, world! It's 2026: don't stop.\tTabs\r\nand \"quotes\" (parens) [brackets] x=1+2*3 end."] * 40
SAMPLE = st.text(st.sampled_from(list("東京日本首都人口。、！？「」…大阪北京是的，abcXYZ'\"{}[]:,;.=+-_ 12\n\t"
                                      "😀👍🏽é\u0301")), max_size=300)


def trained(directory: Path, sentencepiece: bool = False, split: str = LLAMA3_SPLIT, nfkc: bool = False,
            added: tuple[str, ...] = ()) -> PromptReader:
    """A real BPE trained here on CJK, JSON and English: byte-level with a regex split (Llama 3's,
    as Llama 3 and Qwen models; or `split`), or SentencePiece-like (spaces as ▁, no split at
    marks); `nfkc`: with that normalizer; `added`: added tokens that strip the spaces beside them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    standin_tokenizer.build(directory)
    if sentencepiece:
        tokenizer = Tokenizer(models.BPE(byte_fallback=True))
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
        alphabet: list[str] = []
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    special = [standin_tokenizer.END_OF_PROMPT_TEXT, standin_tokenizer.ASSISTANT_TEXT, standin_tokenizer.END_TEXT]
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet,
                                                               special_tokens=special, show_progress=False))
    if nfkc:
        tokenizer.normalizer = normalizers.NFKC()
    if added:
        tokenizer.add_tokens([AddedToken(t, rstrip=True, lstrip=True) for t in added])
    tokenizer.save(str(directory / "tokenizer.json"))
    return PromptReader(model_files.find(ModelSource(str(directory)), {}), piece_chars=8)


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory) -> PromptReader:
    return trained(tmp_path_factory.mktemp("llama3-like"))


def test_a_byte_level_tokenizer_is_cut_at_marks_and_a_sentencepiece_or_nfkc_one_is_not(llama3_like, tmp_path):
    assert llama3_like.in_pieces and llama3_like.at_marks
    assert not trained(tmp_path / "sp", sentencepiece=True).at_marks
    assert not trained(tmp_path / "nfkc", nfkc=True).at_marks  # NFKC makes ™ the letters TM


O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("text", ["I don't know, it's café's.", "“Quoted” don’t — ok",
                                  "### Response: yes ### Response:x"])
def test_contractions_and_space_stripping_added_tokens_are_never_cut(tmp_path, text):
    """o200k keeps a contraction with its word; an added token may strip the spaces beside it."""
    reader = trained(tmp_path, split=O200K_SPLIT, added=("### Response:",))
    reader.piece_chars = 1
    assert reader.token_ids((text, False)) == reader._whole(text)
    bounded = [t for piece, _ in reader.token_pieces((text, False)) for t in piece]
    assert bounded == reader._whole(text)[:len(bounded)]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300, deadline=None)
@given(SAMPLE)
def test_cjk_json_and_emoji_read_in_pieces_are_the_whole_s_tokens(llama3_like, text):
    whole = llama3_like._whole(text)
    assert llama3_like.token_ids((text, False)) == whole
    bounded = [t for piece, _ in llama3_like.token_pieces((text, False)) for t in piece]
    assert bounded == whole[:len(bounded)]  # read less, never differently


def test_text_with_nowhere_to_cut_is_read_only_a_few_pieces_deep(llama3_like):
    text = "東京" * 5000  # no space, no mark: tokenized whole it would hold the worker's loop
    covered = sum(chars for _, chars in llama3_like.token_pieces((text, False)))
    assert covered == 0 and llama3_like.token_ids((text, False)) == llama3_like._whole(text)
    marked = "東京。" * 5000
    pieces = list(llama3_like.token_pieces((marked, False)))
    assert sum(c for _, c in pieces) == len(marked) and max(c for _, c in pieces) <= 8 * LONGEST_PIECE


def test_kept_pieces_are_bounded_in_bytes(tmp_path):
    reader = PromptReader(model_files.find(ModelSource(str(standin_tokenizer.build(tmp_path))), {}),
                          piece_chars=64, cache_bytes=20_000)
    for n in range(200):
        reader.token_ids((f"{n} " + "東京 " * 100, False))
        assert reader.cached_bytes <= 20_000


def test_the_manual_states_the_reader_s_bounds():
    from harness import ROOT

    from vllm_dp_supervisor.kvcache.prompts import CACHE_BYTES

    page = " ".join((ROOT / "docs" / "router.md").read_text().split())
    assert f"no place to cut within {LONGEST_PIECE} pieces' worth is not read further" in page
    assert f"Pieces are kept, within {CACHE_BYTES >> 20} MiB" in page
