"""Tokenizer loading and chat rendering, with `tokenizers` and `jinja2` alone (no transformers).

A tokenizer directory holds tokenizer.json and optionally tokenizer_config.json (and chat_template.jinja), as
MiniMind and the Hugging Face hub ship them. Without a config, MiniMind's special tokens are assumed. A chat is
rendered with the directory's own chat template (chat_template.jinja, else tokenizer_config.json's chat_template),
in the sandboxed Jinja environment transformers' apply_chat_template uses, and tokenized as one text with the
special-token strings mapped to their ids: the ids equal apply_chat_template's. Without a template: ChatML.
"""

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from train.config import REPO_ROOT

DEFAULT_TOKENIZER_DIR = REPO_ROOT / "model" / "tokenizer"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MINIMIND_SPECIAL_TOKENS = {"bos_token": IM_START, "eos_token": IM_END, "pad_token": "<|endoftext|>"}
CHATML_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                   "{%- endif %}")
BUILT_IN_CHATML = "the built-in ChatML template"
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render, or whose assistant turns cannot be located in it."""


class _GenerationBlock(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} marks, rendered as their body (as transformers does when
    it is not asked for assistant masks): templates that carry them render here too."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore-prefixed attributes (a way towards CPython internals), as transformers'."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """The template in transformers' environment: sandboxed (a template from elsewhere is data, never code),
    trim_blocks and lstrip_blocks, loop controls, its tojson (no HTML escaping), raise_exception, strftime_now."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                               strftime_now=lambda format: datetime.now().strftime(format),
                               dict=lambda *args, **kwargs: dict(*args, **kwargs))
    return environment.from_string(source)


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, name_or_path: str, fingerprint: str, special_tokens: dict,
                 chat_template: str = CHATML_TEMPLATE, chat_template_source: str = BUILT_IN_CHATML):
        self.name_or_path = name_or_path
        self.fingerprint = fingerprint  # sha256 of tokenizer.json: part of every prepared-data cache key
        self.special_tokens = special_tokens  # {"bos_token": "<|im_start|>", ...}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Two views of one vocabulary: `backend` reads special-token strings as text (a literal "<|im_end|>" in a
        # model's answer or a plain encode() is data), `markup` maps them to their ids, as Hugging Face tokenizers do.
        self.markup = tokenizers.Tokenizer.from_str(backend.to_str())
        self.backend = backend
        backend.encode_special_tokens = True
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source  # a file, or BUILT_IN_CHATML
        self._template = compile_chat_template(chat_template)
        self._template_tokens = {name: token for name, token in special_tokens.items() if token is not None}

    def __repr__(self):
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Ids of text, special-token strings included as plain text."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], split_special_tokens: bool = False) -> list[list[int]]:
        """Ids of each text; special-token strings map to their ids unless split_special_tokens (Hugging Face's
        name: encode them as plain text)."""
        backend = self.backend if split_special_tokens else self.markup
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def bos_id(self) -> int:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int:
        return self._special_id("pad_token")

    def _special_id(self, name):
        token = self.special_tokens.get(name)
        if token is None:
            raise ValueError(f"tokenizer {self.name_or_path} has no {name} (its tokenizer_config.json names none)")
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.name_or_path}: {name} {token!r} is not in its vocabulary")
        return token_id

    # ----- chats -----
    def render_text(self, messages: list[dict], tools=None, add_generation_prompt: bool = False) -> str:
        """The template's text, as apply_chat_template(tokenize=False) renders it."""
        if self.chat_template_source == BUILT_IN_CHATML:
            for token in (IM_START, IM_END):
                if self.backend.token_to_id(token) is None:
                    raise ChatTemplateError(f"tokenizer {self.name_or_path} lacks {token!r}, needed for "
                                            f"{BUILT_IN_CHATML} (its directory has no chat template)")
        # transformers passes reasoning under the names templates read it by: reasoning_content, and thinking.
        messages = [{"thinking": message["reasoning_content"], **message} if "reasoning_content" in message
                    else message for message in messages]
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._template_tokens)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template ({self.chat_template_source}) failed: "
                                    f"{type(error).__name__}: {error}") from None

    def chat_spans(self, messages: list[dict], tools=None, add_generation_prompt: bool = False):
        """(text, [(start, end)]): the rendering and the character span of each assistant turn in it.

        A turn is found by rendering incrementally: its span starts where the conversation up to it plus the generation
        prompt stops agreeing with the conversation through it (what the model writes after the generation prompt:
        with MiniMind-3's template, the content after the empty think block, or the reasoning when there is some), and
        ends with the turn's last eos token (the model learns to stop; the newline after it is never generated).
        The template's {% generation %} marks are not used: MiniMind's templates have none, and this works for any
        template that renders a conversation's beginning the same alone and inside the whole.
        """
        text = self.render_text(messages, tools, add_generation_prompt)
        eos = self.special_tokens.get("eos_token")
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            turn = self.render_text(messages[:index + 1], tools)
            if not text.startswith(turn):
                raise ChatTemplateError(f"the chat template ({self.chat_template_source}) renders the conversation "
                                        f"through message {index} differently alone and inside the whole conversation, "
                                        f"so that assistant turn cannot be located for the loss mask")
            prompt = self.render_text(messages[:index], tools, add_generation_prompt=True)
            start = len(os.path.commonprefix([prompt, turn]))
            end = turn.rfind(eos, start) if eos else -1
            spans.append((start, end + len(eos) if end >= 0 else len(turn)))
        return text, spans

    def tokenize_chats(self, rendered: list[tuple[str, list]]) -> list[tuple[list[int], np.ndarray]]:
        """(ids, loss mask) of each (text, spans) of chat_spans: 1 on each token overlapping an assistant span."""
        results = []
        for encoding, (_, spans) in zip(self.markup.encode_batch([text for text, _ in rendered],
                                                                 add_special_tokens=False), rendered):
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(offsets), dtype=np.uint8)
            for start, end in spans:
                mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
            results.append((encoding.ids, mask))
        return results

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools=None) -> tuple[list[int], list[int]]:
        """Ids of the chat (apply_chat_template's) and its loss mask: 1 on the assistant turns (chat_spans)."""
        (ids, mask), = self.tokenize_chats([self.chat_spans(messages, tools, add_generation_prompt)])
        return ids, mask.tolist()


def _config_template(config: dict, config_file: Path):
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (its "default" is used)."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{config_file}: field 'chat_template' must be a string or a list of {{name, template}} with a "
                     f"'default' one, got {json.dumps(template)[:80]}")


def load_tokenizer(path=DEFAULT_TOKENIZER_DIR) -> Tokenizer:
    """Load a tokenizer directory: the shipped one by default, or a user's MiniMind tokenizer dir."""
    directory = Path(path)
    tokenizer_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found (a tokenizer directory holds tokenizer.json "
                                f"and optionally tokenizer_config.json)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:
        raise ValueError(f"{tokenizer_file}: not a valid tokenizers file: {error}") from error
    special_tokens = dict(MINIMIND_SPECIAL_TOKENS)
    chat_template, source = CHATML_TEMPLATE, BUILT_IN_CHATML
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}:{error.lineno}: malformed JSON: {error.msg}") from error
        for name in special_tokens:
            token = config.get(name)
            # transformers may serialize a token as an AddedToken dict.
            special_tokens[name] = token["content"] if isinstance(token, dict) else token
        if (template := _config_template(config, config_file)) is not None:
            chat_template, source = template, f"{config_file}: chat_template"
    if (directory / TEMPLATE_FILE).is_file():  # transformers' newer layout; it wins over the config's, as there
        chat_template, source = (directory / TEMPLATE_FILE).read_text(encoding="utf-8"), str(directory / TEMPLATE_FILE)
    try:
        fingerprint = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
        return Tokenizer(backend, str(directory), fingerprint, special_tokens, chat_template, source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"{source}: not a valid Jinja chat template: line {error.lineno}: {error.message}") from None
