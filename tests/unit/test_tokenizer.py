from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from router.hashing.segments import SegmentCache, cut_points, piecewise_is_exact
from router.hashing.tokenizer import ModelTokenizer, TemplateError


@pytest.fixture(scope="module")
def tok(sim_model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_dir(sim_model_dir)


@pytest.fixture(scope="module")
def raw(sim_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(sim_model_dir / "tokenizer.json"))


def test_completion_adds_bos_chat_does_not_double_it(tok: ModelTokenizer) -> None:
    assert tok.encode_completion("hello world")[0] == 1
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[0] == 1 and ids[1] != 1  # the template writes BOS once; encoding adds none


def test_chat_renders_generation_prompt_and_text_parts(tok: ModelTokenizer) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text = tok.render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": parts}])
    assert text == "<s><|im_start|>system\ns<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert not no_gen.endswith("assistant\n")


def test_chat_template_file_wins_over_config(tmp_path: Path, sim_model_dir: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sim_model_dir / f, tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert ModelTokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "q"}]) == "[q]"


def test_no_template_is_a_clear_error(tmp_path: Path, sim_model_dir: Path) -> None:
    shutil.copy(sim_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((sim_model_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemplateError):
        ModelTokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "q"}])


def test_raise_exception_in_template_is_a_template_error(tmp_path: Path, sim_model_dir: Path) -> None:
    shutil.copy(sim_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="alternate"):
        ModelTokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "q"}])


_text = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs", "Cc", "So")), max_size=400)


@settings(max_examples=150, deadline=None)
@given(prefix=_text, tail=_text)
def test_segment_cache_gives_exactly_the_whole_text_ids(tok: ModelTokenizer, raw: Tokenizer, prefix: str,
                                                         tail: str) -> None:
    cache = SegmentCache(lambda s: raw.encode(s, add_special_tokens=False).ids, chunk_chars=8)
    for text in (prefix + tail, prefix + tail + tail, prefix):
        assert cache.encode(text) == raw.encode(text, add_special_tokens=False).ids
        assert tok.encode_completion(text) == raw.encode(text).ids


def test_cuts_depend_only_on_the_prefix() -> None:
    a = "word " * 300 + "alpha beta"
    b = "word " * 300 + "gamma delta epsilon"
    shared = [c for c in cut_points(a, 64) if c < 1400]
    assert shared == [c for c in cut_points(b, 64) if c < 1400] and shared


def test_repeated_prefix_hits_the_cache(tok: ModelTokenizer) -> None:
    doc = "the cache router sends each request where its prefix is " * 200
    assert tok.segment_cache is not None
    before = tok.segment_cache.hits
    tok.encode_completion(doc + "first question")
    tok.encode_completion(doc + "second question")
    assert tok.segment_cache.hits > before


def test_a_tokenizer_that_merges_across_spaces_is_refused() -> None:
    # Metaspace-style: every piece gets its own leading marker, so pieces differ from the whole.
    def encode(s: str) -> list[int]:
        return [ord(c) for c in ("_" + s.replace(" ", "_"))]

    assert not piecewise_is_exact(encode, ["some text to split here"])


# Uses the globals (namespace, range, raise_exception), loop controls, the special tokens, tools
# and a template kwarg: everything render_chat puts in the context it builds itself.
_RICH = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for i in range(2) %}.{% endfor %}{% if ns.n > 50 %}{% break %}{% endif %}{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    "{% if messages | length == 0 %}{{ raise_exception('no messages') }}{% endif %}"
)
_RICH_TOK: list[ModelTokenizer] = []
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                            "content": _text}), max_size=8)


@settings(max_examples=200, deadline=None)
@given(messages=_messages, gen=st.booleans(), thinking=st.sampled_from([None, True, False]),
       tools=st.sampled_from([None, [{"type": "function", "function": {"name": "f"}}]]))
def test_render_chat_equals_jinjas_own_render(sim_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                                              messages: list[dict[str, str]], gen: bool, thinking: bool | None,
                                              tools: list[dict[str, object]] | None) -> None:
    if not _RICH_TOK:
        directory = tmp_path_factory.mktemp("rich-template")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(sim_model_dir / f, directory / f)
        (directory / "chat_template.jinja").write_text(_RICH)
        _RICH_TOK.append(ModelTokenizer.from_dir(directory))
    tok = _RICH_TOK[0]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    template = tok._template
    assert template is not None
    if not messages:
        with pytest.raises(TemplateError, match="no messages"):
            tok.render_chat(messages, add_generation_prompt=gen, tools=tools, template_kwargs=kwargs)
        return
    expected = template.render(**kwargs, **tok.special_tokens, messages=messages, add_generation_prompt=gen,
                               tools=tools)
    assert tok.render_chat(messages, add_generation_prompt=gen, tools=tools, template_kwargs=kwargs) == expected
