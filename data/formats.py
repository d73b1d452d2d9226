"""MiniMind's jsonl schemas, parsed record by record; every error names file:line and the field.

  pretrain  {"text": str}                                   (midtrain uses it too)
  sft       {"conversations": [{"role", "content", optional "reasoning_content", "tool_calls"}, ...],
             optional "tools": [...]}
  dpo       {"chosen": [messages], "rejected": [messages], optional "tools"}
  rl        sft form, the last assistant message (if any) dropped, optional "answer": str

Roles: system, user, assistant, tool. Tools are the record's "tools", or (MiniMind's loader) the first message's
"tools" or "functions" when it is the system message. Whether the chat template renders each of these is checked
where the conversation is rendered (data/prepare.py): nothing is dropped silently.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Optional

KINDS = ("pretrain", "sft", "dpo", "rl")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Optional message fields the chat template receives, with their types; any other field is refused.
MESSAGE_FIELDS = {"reasoning_content": str, "tool_calls": list, "name": str, "tool_call_id": str}
TOOLS_FIELDS = ("tools", "functions")  # on a first, system message: MiniMind's loader passes them as tools


class Chat(NamedTuple):
    messages: list[dict]
    tools: Optional[list] = None


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


def _message(message, label, where, first):
    if not isinstance(message, dict):
        raise DataFormatError(f"{where}: field '{label}' must be dict with 'role' and 'content', "
                              f"got {type(message).__name__}")
    role = _field(message, "role", str, where, f"{label}.role")
    if role not in CHAT_ROLES:
        raise DataFormatError(f"{where}: field '{label}.role': unknown role {role!r} "
                              f"(valid: {', '.join(CHAT_ROLES)})")
    parsed = {"role": role, "content": _field(message, "content", str, where, f"{label}.content")}
    tools = None
    for key in message:
        if key in ("role", "content") or message[key] is None:  # null: absent, as apply_chat_template takes it
            continue
        if key in MESSAGE_FIELDS:
            parsed[key] = _field(message, key, MESSAGE_FIELDS[key], where, f"{label}.{key}")
        elif key in TOOLS_FIELDS and first and role == "system":
            if tools is not None:
                raise DataFormatError(f"{where}: field '{label}.{key}': tools given twice (tools and functions)")
            tools = _field(message, key, list, where, f"{label}.{key}")
        else:
            raise DataFormatError(f"{where}: field '{label}.{key}': not a message field (valid: role, content, "
                                  f"{', '.join(MESSAGE_FIELDS)}; tools or functions on a first system message)")
    return parsed, tools


def _conversation(record, name, where) -> Chat:
    messages = _field(record, name, list, where)
    if not messages:
        raise DataFormatError(f"{where}: field '{name}' is an empty conversation")
    parsed = [_message(message, f"{name}[{i}]", where, i == 0) for i, message in enumerate(messages)]
    tools = parsed[0][1]
    if record.get("tools") is not None:
        if tools is not None:
            raise DataFormatError(f"{where}: field 'tools': tools given twice (here and on {name}[0])")
        tools = _field(record, "tools", list, where)
    return Chat([message for message, _ in parsed], tools)


def parse_record(kind: str, record: dict, where: str):
    """pretrain -> text; sft -> Chat; dpo -> (chosen, rejected); rl -> (Chat, answer or None)."""
    if kind == "pretrain":
        return _field(record, "text", str, where)
    if kind == "sft":
        return _conversation(record, "conversations", where)
    if kind == "dpo":
        return _conversation(record, "chosen", where), _conversation(record, "rejected", where)
    if kind == "rl":
        chat = _conversation(record, "conversations", where)
        if chat.messages[-1]["role"] == "assistant":
            chat = chat._replace(messages=chat.messages[:-1])  # the policy writes that turn
        if not chat.messages:
            raise DataFormatError(f"{where}: field 'conversations' has no prompt before the assistant turn")
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataFormatError(f"{where}: field 'answer' must be str, got {type(answer).__name__}")
        return chat, answer
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
