"""MiniMind's jsonl schemas, parsed record by record; every error names file:line and the field.

  pretrain  {"text": str}                                   (midtrain uses it too)
  sft       {"conversations": [{"role", "content"}, ...]}
  dpo       {"chosen": [messages], "rejected": [messages]}
  rl        sft form, the last assistant message (if any) dropped, optional "answer": str
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from data.tokenizer import CHAT_ROLES

KINDS = ("pretrain", "sft", "dpo", "rl")


class DataFormatError(ValueError):
    pass


def _parse_line(path: Path, line_number: int, line: bytes) -> dict:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}:{line_number}: not valid UTF-8 ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{line_number}: malformed JSON: {error.msg} (column {error.colno})") from error
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: Path, bad_records: Optional[list] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line. With `bad_records` (a list), a line that is not a JSON
    object is skipped and its error message appended there, instead of raised."""
    records = 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = _parse_line(path, line_number, line)
            except DataFormatError as error:
                if bad_records is None:
                    raise
                bad_records.append(str(error))
                continue
            records += 1
            yield line_number, record
    if records == 0 and not bad_records:
        raise DataFormatError(f"{path}: empty file (no records)")


def _field(record, name, expected_type, where, label=None):
    label = label or name
    if name not in record:
        raise DataFormatError(f"{where}: missing field '{label}'")
    value = record[name]
    if not isinstance(value, expected_type):
        raise DataFormatError(f"{where}: field '{label}' must be {expected_type.__name__}, "
                              f"got {type(value).__name__}")
    return value


def _conversation(record, name, where):
    messages = _field(record, name, list, where)
    if not messages:
        raise DataFormatError(f"{where}: field '{name}' is an empty conversation")
    parsed = []
    for i, message in enumerate(messages):
        label = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}: field '{label}' must be dict with 'role' and 'content', "
                                  f"got {type(message).__name__}")
        role = _field(message, "role", str, where, f"{label}.role")
        if role not in CHAT_ROLES:
            raise DataFormatError(f"{where}: field '{label}.role': unknown role {role!r} "
                                  f"(valid: {', '.join(CHAT_ROLES)})")
        parsed.append({"role": role, "content": _field(message, "content", str, where, f"{label}.content")})
    return parsed


def parse_record(kind: str, record: dict, where: str):
    """pretrain -> text; sft -> messages; dpo -> (chosen, rejected); rl -> (messages, answer or None)."""
    if kind == "pretrain":
        return _field(record, "text", str, where)
    if kind == "sft":
        return _conversation(record, "conversations", where)
    if kind == "dpo":
        return _conversation(record, "chosen", where), _conversation(record, "rejected", where)
    if kind == "rl":
        messages = _conversation(record, "conversations", where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the policy writes that turn
        if not messages:
            raise DataFormatError(f"{where}: field 'conversations' has no prompt before the assistant turn")
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataFormatError(f"{where}: field 'answer' must be str, got {type(answer).__name__}")
        return messages, answer
    raise ValueError(f"unknown data kind {kind!r} (valid: {', '.join(KINDS)})")


def read_records(path: Path, kind: str, bad_records: Optional[list] = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for every record of a jsonl file of the given kind; `bad_records` as in
    read_jsonl, for schema errors too."""
    for line_number, record in read_jsonl(path, bad_records):
        try:
            yield line_number, parse_record(kind, record, f"{path}:{line_number}")
        except DataFormatError as error:
            if bad_records is None:
                raise
            bad_records.append(str(error))
