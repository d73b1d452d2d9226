"""Tokenizer loading and the ChatML chat template, with `tokenizers` alone (no transformers).

A tokenizer directory holds tokenizer.json and optionally tokenizer_config.json, as
MiniMind ships them. Without a config, MiniMind's special tokens are assumed.
"""

import hashlib
import json
from pathlib import Path

import tokenizers

from train.config import REPO_ROOT

DEFAULT_TOKENIZER_DIR = REPO_ROOT / "model" / "tokenizer"
CHAT_ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MINIMIND_SPECIAL_TOKENS = {"bos_token": IM_START, "eos_token": IM_END, "pad_token": "<|endoftext|>"}


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, name_or_path: str, fingerprint: str, special_tokens: dict):
        self.backend = backend
        self.name_or_path = name_or_path
        self.fingerprint = fingerprint  # sha256 of tokenizer.json: part of every prepared-data cache key
        self.special_tokens = special_tokens  # {"bos_token": "<|im_start|>", ...}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Text is data, never control: a literal "<|im_end|>" inside a message must not end the turn.
        backend.encode_special_tokens = True
        self._header_ids = {}
        self._newline_ids = self.encode("\n")

    def __repr__(self):
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

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

    def _token_id(self, token, needed_for):
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.name_or_path} lacks {token!r}, needed for {needed_for}")
        return token_id

    def _header(self, role):
        """Ids of '<|im_start|>{role}\\n'; encoded on its own so that the mask boundary is exact."""
        if role not in self._header_ids:
            if role not in CHAT_ROLES:
                raise ValueError(f"unknown chat role {role!r} (valid: {', '.join(CHAT_ROLES)})")
            self._header_ids[role] = [self._token_id(IM_START, "the ChatML chat template")] + self.encode(role + "\n")
        return self._header_ids[role]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """ChatML ids and loss mask: '<|im_start|>{role}\\n{content}<|im_end|>\\n' per message.

        The mask is 1 on each assistant turn's content and its closing <|im_end|> (the model
        must learn to stop), 0 elsewhere, including the newline after <|im_end|>. Each segment
        is tokenized on its own, which matches generation, where the prompt ends right after
        '<|im_start|>assistant\\n'.
        """
        self._token_id(IM_START, "the ChatML chat template")
        im_end = self._token_id(IM_END, "the ChatML chat template")
        contents = self.encode_batch([message["content"] for message in messages])
        ids, mask = [], []
        for message, content in zip(messages, contents):
            header = self._header(message["role"])
            supervised = int(message["role"] == "assistant")
            ids += header + content + [im_end] + self._newline_ids
            mask += [0] * len(header) + [supervised] * (len(content) + 1) + [0] * len(self._newline_ids)
        if add_generation_prompt:
            header = self._header("assistant")
            ids += header
            mask += [0] * len(header)
        return ids, mask


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
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}:{error.lineno}: malformed JSON: {error.msg}") from error
        for name in special_tokens:
            token = config.get(name)
            # transformers may serialize a token as an AddedToken dict.
            special_tokens[name] = token["content"] if isinstance(token, dict) else token
    fingerprint = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    return Tokenizer(backend, str(directory), fingerprint, special_tokens)
