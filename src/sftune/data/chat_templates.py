"""Chat templates shipped with sftune, for `--chat-template NAME`, and reading a template FILE.

A tokenizer without a template (a base model's, like the Gemma 3 270M preset's) or with one
that does not render tool calls (SmolLM2-Instruct's ChatML) can train chats with one of these:

    sftune prepare chats.jsonl --tokenizer smollm2-135m --seq-length 256 --chat-template chatml
    sftune train --train-data chats.jsonl --lora --chat-template my_template.jinja

`chatml`: ChatML (`<|im_start|>role ... <|im_end|>`, SmolLM2's and Qwen's layout) with tools in
the Hermes/Qwen 2.5 style: the tools list as JSON in the system turn, each call as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the assistant turn, each tool
result its own `tool` turn. It writes no default system prompt.
`llama3`: Llama 3.1 Instruct's own template (the "26 Jul 2024" revision): tools in the first
user turn, a call as JSON ended by `<|eot_id|>`, results as `ipython` turns; one call per turn.

Both are prefix-consistent (a conversation's first k messages render as a prefix of the whole),
which is how sftune finds the turns it trains (`templates.DocumentRenderer`). A FILE is read as
text and rendered by transformers' sandboxed Jinja environment, never executed as code. The
template is set on the tokenizer before packing (`tokenizer.chat_template = ...`), so it enters
the packing cache key with the tokenizer and is saved with `final/`'s tokenizer and by
`sftune export`: `generate`, `eval` and a later run read the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftune.errors import ConfigError

CHATML = """{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}
{%- if tools -%}
    {{- '<|im_start|>system\\n' }}
    {%- if system is not none %}{{ system + '\\n\\n' }}{% endif -%}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '
        'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
        '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif system is not none -%}
    {{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant\\n' + (message['content'] or '') }}
        {%- for call in message['tool_calls'] or [] -%}
            {%- if message['content'] or not loop.first %}{{ '\\n' }}{% endif -%}
            {%- set arguments = call['function']['arguments'] -%}
            {{- '<tool_call>\\n{"name": "' + call['function']['name'] + '", "arguments": ' }}
            {{- arguments if arguments is string else arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor -%}
        {{- '<|im_end|>\\n' }}
    {%- elif message['role'] != 'system' -%}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}
"""

# Llama 3.1 Instruct (the "26 Jul 2024" revision), as its tokenizer_config.json ships it.
LLAMA3 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
HINT = f"--chat-template NAME ({', '.join(NAMED_TEMPLATES)}) or --chat-template FILE (Jinja)"


def read_chat_template(value: str) -> str:
    """The template text of `--chat-template`: a shipped NAME, else a Jinja FILE read as text."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--chat-template {value}: neither a named template "
            f"({', '.join(NAMED_TEMPLATES)}) nor a file; give a name or a Jinja file's path"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {value}: cannot read it as text ({e})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {value}: the file is empty")
    _check_syntax(value, text)
    return text


def set_chat_template(tokenizer: Any, value: str | None, text: str | None = None) -> Any:
    """`tokenizer` with `--chat-template value` as its chat template (None: left as it is);
    `text`: the template already read by `read_chat_template(value)`."""
    if value:
        tokenizer.chat_template = text or read_chat_template(value)
        tokenizer.sftune_chat_template = value  # named in errors instead of the tokenizer
    return tokenizer


def _check_syntax(value: str, text: str) -> None:
    """A Jinja syntax error, found now in one line rather than at the first chat record."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:  # transformers' own sandboxed environment, with its extensions ({% generation %})
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise ConfigError(
            f"--chat-template {value}:{e.lineno}: Jinja syntax error: {e.message}"
        ) from None
