"""Chat templates: exact prompts against llama-server's /apply-template, capabilities against its
/props, message normalisation, and the sandbox (hostile templates fail with TemplateError)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.text.chat import CHATML_SOURCE, MAX_OUTPUT_CHARS, ChatTemplate, TemplateError
from engine.loading.gguf import read_metadata
from conftest import DATA, model_file

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3-270m": "gemma-3-270m",
          "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct"}

# chat_template_caps from llama-server's /props for each model (shared/fixtures/.../endpoints.json)
LLAMACPP_CAPS = {
    "smollm2": dict(string_content=True, typed_content=False, system_role=True, tools=False, tool_calls=False,
                    object_arguments=False, parallel_tool_calls=False),
    "gemma3-270m": dict(string_content=True, typed_content=False, system_role=True, tools=False,
                        tool_calls=False, object_arguments=False, parallel_tool_calls=False),
    "qwen2.5-coder-0.5b": dict(string_content=True, typed_content=False, system_role=True, tools=True,
                               tool_calls=True, object_arguments=True, parallel_tool_calls=True),
}

_templates: dict[str, ChatTemplate] = {}


def model_template(fixture: str) -> ChatTemplate:
    if fixture not in _templates:
        _templates[fixture] = ChatTemplate.from_gguf_metadata(read_metadata(model_file(MODELS[fixture])))
    return _templates[fixture]


def caps(t: ChatTemplate) -> dict[str, bool]:
    return {k[len("supports_"):]: v for k, v in vars(t).items() if k.startswith("supports_")}


def conversations() -> list:
    cases = []
    for fixture in MODELS:
        for conv in json.loads((DATA / fixture / "templates.json").read_text())["conversations"]:
            cases.append(pytest.param(fixture, conv, id=f"{fixture}-{conv['name']}"))
    return cases


@pytest.mark.parametrize("fixture,conv", conversations())
def test_prompt_matches_llama_server(fixture: str, conv: dict) -> None:
    assert conv["status"] == 200
    req = conv["request"]
    assert model_template(fixture).render(req["messages"], tools=req.get("tools")) == conv["prompt"]


@pytest.mark.parametrize("fixture", list(MODELS))
def test_caps_match_llama_server(fixture: str) -> None:
    assert caps(model_template(fixture)) == LLAMACPP_CAPS[fixture]


def test_model_tokens_and_fallback() -> None:
    smol, gemma, qwen = (model_template(f) for f in MODELS)
    assert (smol.bos_token, smol.eos_token, smol.is_fallback) == ("<|im_start|>", "<|im_end|>", False)
    assert (qwen.bos_token, qwen.eos_token, qwen.is_fallback) == ("<|endoftext|>", "<|im_end|>", False)
    # the gemma-3-270m file carries no template: llama-server's ChatML, no default system prompt
    assert (gemma.bos_token, gemma.eos_token, gemma.is_fallback) == ("<bos>", "<eos>", True)
    assert gemma.source == CHATML_SOURCE and gemma.add_bos
    assert ChatTemplate(None).is_fallback and ChatTemplate("chatml").source == CHATML_SOURCE


def test_alt_template_from_file_with_tools(tmp_path) -> None:
    """--chat-template-file: llama-server ran smollm2 with Qwen2.5's template (tools, tool calls)."""
    alt = json.loads((DATA / "smollm2" / "tools_alt_template.json").read_text())
    path = tmp_path / "qwen.jinja"
    path.write_text(alt["chat_template_in_use"])
    meta = read_metadata(model_file(MODELS["smollm2"]))
    t = ChatTemplate.from_gguf_metadata(meta, override_path=str(path))
    assert t.source == alt["chat_template_in_use"] and t.bos_token == "<|im_start|>"
    expected_caps = {k[len("supports_"):]: v for k, v in alt["chat_template_caps"].items()
                     if k[len("supports_"):] in caps(t)}
    assert caps(t) == expected_caps
    records = [r for r in alt["records"] if "prompt" in r]
    assert len(records) == 2
    for rec in records:
        body = rec["request_body"]
        assert t.render(body["messages"], tools=body.get("tools")) == rec["prompt"], rec["name"]
    with pytest.raises(TemplateError, match="cannot read"):
        ChatTemplate.from_gguf_metadata(meta, override_path=str(tmp_path / "missing.jinja"))


QWEN_LIKE = json.loads((DATA / "smollm2" / "tools_alt_template.json").read_text())["chat_template_in_use"]


def test_tool_call_arguments() -> None:
    t = ChatTemplate(QWEN_LIKE)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": "ü<&>", "n": 2}'}}
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    out = t.render(msgs, add_generation_prompt=False)
    # a JSON-string argument reaches the template as an object; tojson keeps non-ASCII and <&>
    assert '{"name": "f", "arguments": {"q": "ü<&>", "n": 2}}' in out
    call["function"]["arguments"] = {"q": "ü<&>", "n": 2}  # already an object: same prompt
    assert t.render(msgs, add_generation_prompt=False) == out
    assert out.endswith("</tool_call><|im_end|>\n")
    call["function"]["arguments"] = "{not json"
    with pytest.raises(TemplateError, match="arguments as JSON"):
        t.render(msgs)
    # a template that prints arguments as text keeps the string (and dumps an object compactly)
    plain = ChatTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}"
                         "{{ c.function.name + ':' + c.function.arguments }}{% endfor %}{% endfor %}")
    assert plain.supports_tool_calls and not plain.supports_object_arguments
    call["function"]["arguments"] = '{"a": 1}'
    assert plain.render(msgs) == 'f:{"a": 1}'
    call["function"]["arguments"] = {"a": [1, "é"]}
    assert plain.render(msgs) == 'f:{"a":[1,"é"]}'


def test_concurrent_renders_agree() -> None:
    convs = json.loads((DATA / "qwen2.5-coder-0.5b" / "templates.json").read_text())["conversations"]
    conv = next(c for c in convs if c["name"] == "tools_call_and_result")
    t = ChatTemplate(QWEN_LIKE)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: t.render(conv["request"]["messages"], tools=conv["request"]["tools"]),
                             range(64)))
    assert set(outs) == {conv["prompt"]}


def test_tools_normalised_and_validated() -> None:
    t = ChatTemplate("{{ tools | tojson }}")
    tools = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "object"}}}]
    assert json.loads(t.render([], tools=tools)) == [
        {"type": "function", "function": {"name": "f", "description": "", "parameters": {"type": "object"}}}]
    assert t.render([], tools=[]) == t.render([], tools=None) == "null"  # tools undefined without tools
    with pytest.raises(TemplateError, match="Missing tool function"):
        t.render([], tools=[{"type": "function"}])
    with pytest.raises(TemplateError, match="Unsupported tool type"):
        t.render([], tools=[{"type": "retrieval", "function": {"name": "f"}}])


def test_content_forms() -> None:
    t = ChatTemplate(None)
    parts = [{"type": "text", "text": ""}, {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}},
             {"type": "text", "text": "b"}]
    out = t.render([{"role": "user", "content": parts}, {"role": "assistant", "content": None}], False)
    assert out == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    with pytest.raises(TemplateError, match="string or an array"):
        t.render([{"role": "user", "content": {"text": "hi"}}])
    # an empty conversation renders (llama-server answers it); qwen's template indexes messages[0]
    assert ChatTemplate(QWEN_LIKE).render([]).endswith("<|im_start|>assistant\n")
    # typed content is detected as llama.cpp does: by the template indexing/iterating a string content.
    # One that branches on `is string` never does, so it gets parts flattened...
    both = ChatTemplate("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
                        "{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %}{% endfor %}")
    assert not both.supports_typed_content and both.supports_string_content
    msgs = [{"role": "user", "content": parts}, {"role": "user", "content": "s"}]
    assert both.render(msgs) == "a\nbs"
    # ...while one that always iterates gets the text parts as a list (and strings unchanged)
    typed = ChatTemplate("{% for m in messages %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}")
    assert typed.supports_typed_content and typed.supports_string_content
    assert typed.render(msgs) == "[][a][b][]"


GEMMA2_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def test_system_merge_bos_strip_and_raise_exception() -> None:
    t = ChatTemplate(GEMMA2_LIKE, bos_token="<bos>", add_bos=True)
    assert not t.supports_system_role
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # developer -> system -> folded into the user turn; the tokenizer adds <bos>, so it is stripped
    assert t.render(msgs) == "<start_of_turn>user\nBe brief.\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert ChatTemplate(GEMMA2_LIKE, bos_token="<bos>").render(msgs[1:]).startswith("<bos><start_of_turn>")
    with pytest.raises(TemplateError, match=r"^Conversation roles must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_jinja_features() -> None:
    src = ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}|"
           "{{ {'k': '<ü>', 'a': [1]} | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|"
           "{% for i in range(4) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}"
           "{{ i }}{% endfor %}|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}|{{ flag }}\n"
           "    {% if true %}\n  x\n    {% endif %}\n")
    out = ChatTemplate(src, "<s>", "</s>").render([{"role": "user", "content": "hey"}], template_kwargs={"flag": "on"})
    year = time.strftime("%Y")
    # trim_blocks + lstrip_blocks: the block lines leave only "  x\n"
    assert out == (f'hey|{{\n  "k": "<ü>",\n  "a": [\n    1\n  ]\n}}|{{"a": 2, "b": 1}}|02|{year}|<s></s>|on\n'
                   "  x\n")


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ self.__init__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages | attr('__class__') }}",
    "{{ messages | map(attribute='__class__') | list }}",
    "{{ open('/etc/passwd').read() }}",
    "{{ __import__('os').system('id') }}",
    "{% import 'os' as os %}{{ os }}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% from 'os' import system %}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update(role='x') }}",
])
def test_sandbox_blocks_escapes(src: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(src).render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("src", [
    "{{ 'x' * 1000000000 }}",
    "{{ [0] * 100000000 }}",
    "{{ (9 ** 1024) ** 1024 }}",
    "{% set ns = namespace(s='x' * 4096) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x' * 4096) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x' * 4096) %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
    "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "{{ range(10000000) | list | length }}",
    "{{ 'a'.ljust(1000000000) }}",
    "{{ 'a' | center(1000000000) }}",
    "{{ 'a' | indent(1000000000) }}",
    "{{ '%0999999999d' | format(1) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:{}}'.format(1, 999999999) }}",
    "{{ ('a' * 1000000).replace('a', 'b' * 64) }}",
    "{{ strftime_now('%999999999Y') }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% set ns = namespace(s='x' * 4096) %}{% for i in range(40) %}{% set ns.s = '%s%s' % (ns.s, ns.s) %}"
    "{% endfor %}",
    "{% set ns = namespace(s='x' * 4096) %}{% for i in range(40) %}{% set ns.s = '{}{}'.format(ns.s, ns.s) %}"
    "{% endfor %}",
    "{% set s = 'x' * 100000 %}{{ ''.join([s] * 1000) }}",
    "{{ ['a'] | batch(1000000000, 'x') | list }}",
    "{{ ['a'] | slice(1000000000) | list }}",
    "{{ lipsum(1000000000) }}",
    "{{ {'a': {'b': 1}} | tojson(indent=1000000000) }}",
    "{% set s = 'x' * 100000 %}{% for i in range(200) %}{{ s }}{% endfor %}",
])
def test_resource_guards(src: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(TemplateError):
        ChatTemplate(src).render([])
    assert time.perf_counter() - t0 < 10


def test_guards_leave_room_for_real_prompts() -> None:
    # 10M characters of output and 100k-wide padding are fine; 2x the output cap is not
    big = "{% set s = 'x' * 100000 %}{% for i in range(N) %}{{ s }}{% endfor %}{{ 'y'.ljust(100000)|length }}"
    out = ChatTemplate(big.replace("N", "100")).render([])
    assert len(out) == 100 * 100000 + 6 and out.endswith("100000")
    with pytest.raises(TemplateError, match="too large"):
        ChatTemplate(big.replace("N", str(2 * MAX_OUTPUT_CHARS // 100000))).render([])


def test_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% for x in %}")
    with pytest.raises(TemplateError, match="^boom$"):
        ChatTemplate("{{ raise_exception('boom') }}").render([])
    with pytest.raises(TemplateError):  # undefined + str: a bare jinja error becomes TemplateError
        ChatTemplate("{{ 'a' + messages[0].nope }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ 1 / 0 }}").render([])
    assert issubclass(TemplateError, ValueError)


def test_render_time_budget_stops_exponential_macros() -> None:
    """A macro that doubles its calls per level (2^40 here) ends at the render's time budget with a
    TemplateError (a 400), whatever shape the loop takes: calls, output, attribute lookups."""
    import time

    from engine.text.chat import RenderTimeout

    boom = "{% macro boom(n) %}{% if n > 0 %}{{ boom(n - 1) }}{{ boom(n - 1) }}{% endif %}{% endmacro %}"
    sources = [boom + "{{ boom(40) }}",
               "{% for a in range(5000) %}{% for b in range(5000) %}{% if a > b %}{% endif %}{% endfor %}{% endfor %}",
               "{% for m in messages * 0 %}{% endfor %}" + boom + "{% set x = boom(40) %}"]
    for src in sources:
        t = ChatTemplate(src)
        t0 = time.monotonic()
        with pytest.raises(TemplateError):
            t.render([{"role": "user", "content": "hi"}], timeout_s=0.3)
        assert time.monotonic() - t0 < 1.5, src
    with pytest.raises(RenderTimeout):
        ChatTemplate(boom + "{{ boom(40) }}").render([], timeout_s=0.2)
