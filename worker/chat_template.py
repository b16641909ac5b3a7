"""Chat templating: a conversation to prompt token ids with the model's chat template.

The engine's loader gives every tokenizer it can a template (Gemma's turn format for GGUF Gemma);
a model left without one gets chat input refused.

Tools go through the template when it renders them (it reads a `tools` variable, as Qwen3's does).
A template that does not gets them as text instead: the definitions in the system turn, with the
instruction to answer in Qwen3's `<tool_call>` blocks (which the gateway parses), earlier calls in the
assistant turns and tool results in user turns.
"""

import inspect
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sfllm_core.errors import InvalidRequestError

# Variables every template gets from transformers besides the caller's: template kwargs must not replace them.
_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "raise_exception", "strftime_now", "dict", "namespace"}
)

_TOOLS_PREAMBLE = (
    "You can call functions to help with the request. Each line below defines one, as JSON:\n"
    "{definitions}\n\n"
    "To call functions, answer with one block per call, each holding only a JSON object with the function's "
    "name and its arguments:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": <arguments as a JSON object>}}\n</tool_call>\n'
    "The results come back in <tool_response></tool_response> blocks."
)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer has a chat template (chat input is refused without one)."""
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] = (),
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Render OpenAI-shaped messages (and tools) with a generation prompt and tokenize them.

    A message has role and content, and may have name, reasoning_content, tool_calls ([{id, type,
    function: {name, arguments: JSON text}}], assistant) and tool_call_id (role "tool"). template_kwargs
    are extra template variables, e.g. {"enable_thinking": False}. Special-token text inside the input
    is encoded as plain text, so a user cannot forge turns.
    """
    if not has_chat_template(tokenizer):
        raise InvalidRequestError("this model has no chat template; send text or token_ids instead", "chat")
    if not messages:
        raise InvalidRequestError("chat.messages must not be empty", "chat.messages")
    conversation = [_message(i, m) for i, m in enumerate(messages)]
    tool_list = [_tool(i, t) for i, t in enumerate(tools)]
    extra = _template_kwargs(tokenizer, template_kwargs or {})
    try:
        source = tokenizer.get_chat_template(None, tool_list or None)
    except ValueError as exc:  # a dict of templates with no default
        raise InvalidRequestError(f"the model's chat template cannot be chosen: {exc}", "chat") from exc
    if not _renders_tools(source):
        conversation = _tools_as_text(conversation, tool_list)
        tool_list = []
    try:
        ids = tokenizer.apply_chat_template(
            conversation,
            tools=tool_list or None,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **extra,
        )
    except Exception as exc:  # templates refuse conversations with raise_exception(...); jinja errors too
        raise InvalidRequestError(f"chat.messages rejected by the chat template: {exc}", "chat.messages") from exc
    return list(ids)


def _message(i: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """A message checked and in the form templates read: tool-call arguments as mappings, not JSON text."""
    field = f"chat.messages[{i}]"
    role = message.get("role")
    if not role or not isinstance(role, str):
        raise InvalidRequestError(f"{field}.role must be set", f"{field}.role")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise InvalidRequestError(f"{field}.content must be a string", f"{field}.content")
    out: dict[str, Any] = {"role": role, "content": content}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if message.get(key):
            out[key] = message[key]
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [_tool_call(f"{field}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
    return out


def _tool_call(field: str, call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, Mapping) or not function.get("name") or not isinstance(function["name"], str):
        raise InvalidRequestError(f"{field}.function.name must be set", f"{field}.function.name")
    arguments = function.get("arguments") or "{}"
    try:
        arguments = arguments if isinstance(arguments, Mapping) else json.loads(arguments)
    except (TypeError, ValueError) as exc:
        param = f"{field}.function.arguments"
        raise InvalidRequestError(f"{param} is not JSON: {exc}", param) from exc
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"{field}.function.arguments must be a JSON object", f"{field}.function.arguments")
    out: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def _tool(i: int, tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not function.get("name") or not isinstance(function["name"], str):
        raise InvalidRequestError(f"chat.tools[{i}].function.name must be set", f"chat.tools[{i}]")
    return {"type": "function", "function": dict(function)}


def _template_kwargs(tokenizer: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The extra template variables; names the template or apply_chat_template already use are refused."""
    own = set(inspect.signature(tokenizer.apply_chat_template).parameters) - {"self", "kwargs"}
    taken = own | _TEMPLATE_VARIABLES | set(getattr(tokenizer, "special_tokens_map", {}))
    for key in kwargs:
        if not isinstance(key, str) or key in taken:
            raise InvalidRequestError(
                f"chat template kwarg {key!r} is reserved (the template's own variable or option)",
                "chat.template_kwargs",
            )
    return dict(kwargs)


@lru_cache(maxsize=16)
def _renders_tools(source: str) -> bool:
    """Whether the template reads a `tools` variable (string literals that say "tools" do not count)."""
    try:
        ast = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError:  # tags only transformers knows, such as {% generation %}
        return re.search(r"\btools\b", source) is not None
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def _tools_as_text(conversation: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with tools, calls and results written out for a template that renders none of them.

    Tool results become user turns, merged with each other and with the user message right after
    them, since templates such as Gemma's want user and assistant turns to alternate.
    """
    out: list[dict[str, Any]] = []
    after_results = False  # the last turn in out is a user turn holding tool results
    for message in conversation:
        role, text = message["role"], message["content"]
        if role == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        if after_results and role in ("tool", "user"):
            out[-1]["content"] += ("\n" if role == "tool" else "\n\n") + text
            after_results = role == "tool"
            continue
        if role == "tool":
            out.append({"role": "user", "content": text})
            after_results = True
            continue
        turn = {k: v for k, v in message.items() if k != "tool_calls"}
        calls = [_call_block(call["function"]) for call in message.get("tool_calls", [])]
        turn["content"] = "\n".join(part for part in [text, *calls] if part)
        out.append(turn)
    if tools:
        definitions = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        preamble = _TOOLS_PREAMBLE.format(definitions=definitions)
        system = next((turn for turn in out if turn["role"] == "system"), None)
        if system is None:
            out.insert(0, {"role": "system", "content": preamble})
        else:
            system["content"] = preamble + ("\n\n" + system["content"] if system["content"] else "")
    return out


def _call_block(function: Mapping[str, Any]) -> str:
    """An earlier call written as the model is told to write calls."""
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"
