"""A model's own chat template: read from its Hugging Face folder, rendered as ``transformers`` renders it.

Instruct models expect their prompts wrapped in the chat format they were tuned on. The format is a Jinja
template shipped with the tokenizer: ``chat_template.jinja`` in the folder, or the ``chat_template`` entry of
``tokenizer_config.json`` (a string, or a list of ``{name, template}`` from which the one named "default"
is taken). A prompt is rendered the way ``tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`` renders it: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the loop controls (``break`` / ``continue``), the ``{% generation %}`` block of
training templates (rendered as its body), ``raise_exception``, ``strftime_now``, a ``tojson`` filter that
keeps non-ASCII text and HTML characters as they are, and the tokenizer's special tokens (``bos_token``,
``eos_token``, ...) as variables. The messages are an optional system turn and one user turn.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib

from evojax_merge.errors import ConfigError, DataError
from evojax_merge.files import read_json_object

# The tokenizer's special tokens, passed to the template as variables of these names.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may read; ``source`` names the file it came from."""

    template: str
    special_tokens: dict[str, str]
    source: str

    def render(self, user: str, system: str | None = None) -> str:
        """The prompt that asks ``user`` (after a ``system`` turn, if given) and opens the assistant's turn.

        Raises:
          DataError: the template fails to render (it raises, or reads something it is not given), naming
            ``source``.
        """
        import jinja2

        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}]
        try:
            return _compiled(self.template).render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=True, **self.special_tokens)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:  # what a template's code may raise
            raise DataError(f"the chat template of {self.source} fails to render a prompt: {e}") from None


def read_chat_template(folder: str | os.PathLike) -> ChatTemplate:
    """The chat template of the model folder ``folder`` (see the module docstring for where it is looked for).

    Raises:
      ConfigError: the folder has no chat template (a prompt format for it must be chosen instead).
      DataError: tokenizer_config.json or the template cannot be read, or the template is not valid Jinja.
    """
    folder = pathlib.Path(folder)
    config_file = folder / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        config = read_json_object(config_file, "a tokenizer config")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():  # transformers saves the template here, and reads it before tokenizer_config.json
        try:
            template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{jinja_file} cannot be read as UTF-8 text: {e}") from None
    else:
        template, source = _template_entry(config.get("chat_template"), config_file), str(config_file)
    if template is None:
        raise ConfigError(f"prompt_format 'chat_template' needs a chat template, and model folder {folder} has none "
                          "(no chat_template.jinja, no 'chat_template' in tokenizer_config.json): use 'plain' or "
                          "'chatml'")
    special = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if config.get(name) is not None}
    chat = ChatTemplate(template, {k: v for k, v in special.items() if v is not None}, source)
    import jinja2

    try:
        _compiled(template)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"the chat template of {source} is not a valid Jinja template: {e} (line {e.lineno})") from None
    return chat


def _template_entry(entry, config_file: pathlib.Path) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or the "default" of a list of named templates."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, list):
        named = {t.get("name"): t.get("template") for t in entry if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise DataError(f"{config_file}: 'chat_template' must be a template string or a list of {{name, template}} "
                    "with one named 'default'")


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an added-token object with 'content'."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


_COMPILED: dict = {}


def _compiled(template: str):
    """The template compiled in the environment transformers renders chat templates in (cached per text)."""
    if template not in _COMPILED:
        _COMPILED[template] = _environment().from_string(template)
    return _COMPILED[template]


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks the assistant's tokens for training): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON text itself.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env
