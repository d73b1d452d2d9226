"""Tokenize a data mixture once into cached token stores; reuse them while nothing changed.

    python -m data.prepare --data_config config/data/pretrain/demo.yaml [--tokenizer DIR] [--cache_dir DIR]
    python -m data.prepare --data_path dataset/sft.jsonl --kind sft --max_seq_len 512   (one source, no validation)

The cache directory is keyed by sha256 of: the resolved config, each input file's
path + size + mtime + content hash, the tokenizer fingerprint and special tokens, and
FORMAT_VERSION. Layout (see data/store.py for one store):

    <cache_dir>/<config name>-<key[:16]>/
        meta.json                 written last; the directory appears by atomic rename
        train/  val/              one store each (dpo: chosen/ and rejected/ inside each)

Documents: pretrain [bos] + text + [eos], mask all ones, kept whole (the loader packs and
splits them), special-token strings in the text mapped to their ids unless split_special_tokens; sft the tokenizer's
chat-template rendering + assistant mask (data/tokenizer.py); dpo the same for chosen and rejected;
rl the prompt with the template's generation prompt, plus answers.json. sft/dpo documents
longer than max_seq_len are truncated and counted as truncated_docs; an rl prompt longer than max_seq_len is a
bad record (the policy continues it, so it cannot be cut).

A bad record (malformed JSON, a missing or wrongly typed field, an unknown role, an empty conversation, an rl
prompt too long, a conversation the chat template fails on, or a tool message, tools, tool_calls or
reasoning_content the template does not render) is an error naming file:line and the field, or with skip_bad_records it is skipped and counted per file in
meta.json's sources (skipped_records, and the first few messages in bad_records).

validation.fraction sends each record to val with that probability, drawn from (seed, the
file's content hash, the record's position): the same file splits the same way in every
config with the same seed. validation.path sends a whole file to val instead.

Several processes may prepare the same config at once: each writes a private temp dir
(.tmp-<store>@<host>-<pid>-<random>) and the first rename wins. A killed prepare leaves its temp
dir behind; the next prepare on that host removes the ones whose process is gone. A full disk is
an OSError naming the cache dir. In distributed training, let rank 0 prepare, then have every rank
call load_prepared(..., require_existing=True) after a barrier.
"""

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.formats import KINDS, MESSAGE_FIELDS, Chat, DataFormatError, read_records
from data.mixture import DataConfig, SourceConfig, load_data_config, one_source_config
from data.store import META, PairedStore, StoreWriter, TokenStore
from data.tokenizer import DEFAULT_TOKENIZER_DIR, ChatTemplateError, Tokenizer, load_tokenizer
from train.config import REPO_ROOT

FORMAT_VERSION = 2  # 2: chats rendered by the tokenizer's template, special-token strings in pretrain text
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "prepared"
SPLITS = ("train", "val")
DPO_SIDES = ("chosen", "rejected")
RECORDS_PER_CHUNK = 2048  # records per encode_batch call: big enough to use every core
BAD_RECORDS_KEPT = 5  # error messages kept per file in meta.json; all are counted
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 1 << 20  # bytes left under which a write error without errno is taken for a full disk


@dataclass
class PreparedData:
    root: Path
    config: DataConfig
    meta: dict
    reused: bool  # True when an existing store was found and nothing was tokenized

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def weights(self) -> list[float]:
        """The mixture's sampling weights, to pass to the training loader."""
        return self.config.weights

    def split(self, name: str = "train") -> TokenStore | PairedStore:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (valid: {', '.join(SPLITS)})")
        if self.kind == "dpo":
            return PairedStore(*(TokenStore(self.root / name / side) for side in DPO_SIDES))
        return TokenStore(self.root / name)


# ---------------------------------------------------------------- cache key

def file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    content_hash = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            content_hash.update(block)
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": content_hash.hexdigest()}


def input_files(config: DataConfig) -> list[Path]:
    files = [source.path for source in config.sources]
    return files + ([config.validation.path] if config.validation.path else [])


def cache_ingredients(config: DataConfig, tokenizer: Tokenizer, skip_bad_records: bool = False,
                      split_special_tokens: bool = False) -> dict:
    """Everything the stores depend on; its sha256 is the cache key. A store made with skip_bad_records has
    its own key: a run without the flag must never reuse it and lose those records silently."""
    ingredients = {
        "format_version": FORMAT_VERSION,
        "config": config.resolved(),
        "files": [file_fingerprint(path) for path in input_files(config)],
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "special_tokens": tokenizer.special_tokens,
                      "chat_template": hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()},
    }
    if skip_bad_records:
        ingredients["skip_bad_records"] = True
    if split_special_tokens:
        ingredients["split_special_tokens"] = True
    return ingredients


def cache_key(ingredients: dict) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode("utf-8")).hexdigest()


def config_name(config: DataConfig) -> str:
    """Readable store-name prefix: config/data/posttrain/sft/general.yaml -> posttrain-sft-general."""
    if config.config_file is None:
        return config.kind
    config_root = REPO_ROOT / "config" / "data"
    file = config.config_file
    relative = file.relative_to(config_root) if file.is_relative_to(config_root) else Path(file.name)
    return "-".join(relative.with_suffix("").parts)


def stale_stores(cache_dir: Path, config: DataConfig, current: Path) -> list[Path]:
    """Stores prepared earlier from the same config file, before its inputs or tokenizer changed."""
    stale = []
    for directory in sorted(cache_dir.glob(f"{config_name(config)}-*")):
        meta_file = directory / META
        if directory != current and meta_file.is_file():
            if json.loads(meta_file.read_text(encoding="utf-8")).get("config_file") == str(config.config_file):
                stale.append(directory)
    return stale


# ---------------------------------------------------------------- tokenization

def _without_each_extra(chat: Chat):
    """(field, the chat without it) for each tool message, tools, tool_calls and reasoning_content of the chat."""
    if chat.tools:
        yield "tools", chat._replace(tools=None)
    for index, message in enumerate(chat.messages):
        if message["role"] == "tool":
            yield f"[{index}] (a tool message)", chat._replace(messages=chat.messages[:index] + chat.messages[index + 1:])
        for key in (key for key in MESSAGE_FIELDS if key in message):
            without = {name: value for name, value in message.items() if name != key}
            yield f"[{index}].{key}", chat._replace(messages=chat.messages[:index] + [without] + chat.messages[index + 1:])


def render_conversation(tokenizer: Tokenizer, chat: Chat, name: str, add_generation_prompt: bool = False):
    """tokenizer.chat_spans of the chat, once the template is seen to render each of its tool messages, tools,
    tool_calls and reasoning_content: one it renders the same without would be dropped silently, so it is refused,
    naming the field (`name` is the record's field holding the conversation)."""
    try:
        rendered = tokenizer.chat_spans(chat.messages, chat.tools, add_generation_prompt)
        for field, without in _without_each_extra(chat):
            if tokenizer.render_text(without.messages, without.tools, add_generation_prompt) == rendered[0]:
                label = field if field == "tools" else name + field
                raise ChatTemplateError(f"field '{label}': the chat template ({tokenizer.chat_template_source}) "
                                        f"does not render it (the conversation renders the same without it); use a "
                                        f"tokenizer whose template does, or leave it out of the data")
    except ChatTemplateError as error:
        message = str(error)
        raise ChatTemplateError(message if message.startswith("field '") else f"field '{name}': {message}") from None
    return rendered


def tokenize_chunk(kind: str, records: list, tokenizer: Tokenizer, split_special_tokens: bool = False) -> list:
    """Per record, one (ids, loss_mask) per store it feeds (two for dpo, one otherwise), or the ChatTemplateError
    that refuses the record."""
    if kind == "pretrain":
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        return [[([bos] + ids + [eos], np.ones(len(ids) + 2, dtype=np.uint8))]
                for ids in tokenizer.encode_batch(records, split_special_tokens)]
    sides = {"sft": lambda chat: [(chat, "conversations")],
             "dpo": lambda pair: [(pair[0], "chosen"), (pair[1], "rejected")],
             "rl": lambda prompt: [(prompt[0], "conversations")]}[kind]
    rendered = []
    for record in records:
        try:
            rendered.append([render_conversation(tokenizer, chat, name, add_generation_prompt=kind == "rl")
                             for chat, name in sides(record)])
        except ChatTemplateError as error:
            rendered.append(error)
    # One batch through the Rust tokenizer for the whole chunk.
    tokenized = iter(tokenizer.tokenize_chats([side for record in rendered if isinstance(record, list)
                                               for side in record]))
    return [record if isinstance(record, ChatTemplateError) else [next(tokenized) for _ in record]
            for record in rendered]


def _tokenize_source(source: SourceConfig, source_index, config, tokenizer, writers, split_of,
                     skip_bad_records: bool, split_special_tokens: bool):
    """Stream one jsonl file into the split writers; returns what was read, filtered and skipped."""
    min_length, max_length = source.min_length, source.max_length
    bad_records = [] if skip_bad_records else None
    records = itertools.islice(read_records(source.path, config.kind, bad_records), source.max_samples)
    truncates = config.kind in ("sft", "dpo")  # pretrain docs are packed, rl prompts must stay whole
    read = filtered = unusable = 0
    while numbered := list(itertools.islice(records, RECORDS_PER_CHUNK)):
        chunk = [record for _, record in numbered]
        read += len(chunk)
        splits = split_of(len(chunk))
        tokenized = tokenize_chunk(config.kind, chunk, tokenizer, split_special_tokens)
        for (line_number, record), sides, split in zip(numbered, tokenized, splits):
            error = None
            if isinstance(sides, ChatTemplateError):
                error = f"{source.path}:{line_number}: {sides}"
            elif config.kind == "rl" and len(sides[0][0]) > config.max_seq_len:
                error = (f"{source.path}:{line_number}: the prompt is {len(sides[0][0])} tokens, longer than "
                         f"max_seq_len {config.max_seq_len} (rl prompts are kept whole)")
            if error:
                if bad_records is None:
                    raise DataFormatError(error)
                bad_records.append(error)
                unusable += 1
                continue
            lengths = [len(ids) for ids, _ in sides]
            if (min_length is not None and min(lengths) < min_length) or \
                    (max_length is not None and max(lengths) > max_length):
                filtered += 1
                continue
            answer = record[1] if config.kind == "rl" else None
            for writer, (ids, mask) in zip(writers[split], sides):
                truncated = truncates and len(ids) > config.max_seq_len
                end = config.max_seq_len if truncated else len(ids)
                writer.append(ids[:end], mask[:end], source_index, truncated, answer)
    bad_records = bad_records or []
    if read == unusable:
        raise DataFormatError(f"{source.path}: no usable records" + (
            f" ({len(bad_records)} bad, all skipped; the first: {bad_records[0]})" if bad_records else ""))
    return {"path": str(source.path), "records": read, "filtered_docs": filtered,
            "skipped_records": len(bad_records), "bad_records": bad_records[:BAD_RECORDS_KEPT]}


def _random_splits(seed, file_sha256, fraction):
    """split_of(n) for the next n records of a file: one draw per record from a stream seeded by
    the file's content, so a record lands in the same split in every config that reads the file
    with this seed (midtrain's replay of pretrain data never trains on pretrain's validation)."""
    draws = np.random.default_rng([seed, int(file_sha256[:16], 16)])
    return lambda n: np.where(draws.random(n) < fraction, "val", "train")


def _write_stores(directory: Path, config: DataConfig, tokenizer: Tokenizer, ingredients: dict,
                  skip_bad_records: bool, split_special_tokens: bool) -> dict:
    started = time.time()
    pad_id = tokenizer.pad_id  # fail before tokenizing, not after, when the tokenizer has none
    train_paths = [str(source.path) for source in config.sources]
    val_paths = [str(config.validation.path)] if config.validation.path else train_paths
    sides = DPO_SIDES if config.kind == "dpo" else ("",)
    # On a failure every writer's files are closed at once: a full disk gets its space back with the temp dir.
    with contextlib.ExitStack() as open_writers:
        writers = {
            split: [open_writers.enter_context(StoreWriter(directory / split / side, tokenizer.vocab_size, paths))
                    for side in sides]
            for split, paths in (("train", train_paths), ("val", val_paths))
        }
        key = cache_key(ingredients)
        sources = []
        for index, source in enumerate(config.sources):
            split_of = _random_splits(config.seed, ingredients["files"][index]["sha256"], config.validation.fraction)
            sources.append(_tokenize_source(source, index, config, tokenizer, writers, split_of, skip_bad_records,
                                            split_special_tokens))
        if config.validation.path:
            validation = SourceConfig(path=config.validation.path, weight=1.0)
            sources.append(_tokenize_source(validation, 0, config, tokenizer, writers, lambda n: ["val"] * n,
                                            skip_bad_records, split_special_tokens))

        splits = {}
        for split, split_writers in writers.items():
            # pad_id travels with the store: the loader pads with it and needs no tokenizer.
            metas = [writer.finish({"key": key, "kind": config.kind, "split": split, "side": side or None,
                                    "pad_id": pad_id},
                                   with_answers=config.kind == "rl")
                     for writer, side in zip(split_writers, sides)]
            splits[split] = dict(zip(sides, metas)) if config.kind == "dpo" else metas[0]
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "kind": config.kind,
        "config_file": str(config.config_file),
        "config": config.resolved(),
        "tokenizer": {"path": tokenizer.name_or_path, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "special_tokens": tokenizer.special_tokens},
        "files": ingredients["files"],
        "sources": sources,
        "splits": splits,
        "prepare_seconds": round(time.time() - started, 3),
    }
    (directory / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


# ---------------------------------------------------------------- public API

def _as_config(config) -> DataConfig:
    return config if isinstance(config, DataConfig) else load_data_config(config)


def _store_dir(config, tokenizer, cache_dir, skip_bad_records, split_special_tokens):
    ingredients = cache_ingredients(config, tokenizer, skip_bad_records, split_special_tokens)
    directory = Path(cache_dir or DEFAULT_CACHE_DIR) / f"{config_name(config)}-{cache_key(ingredients)[:16]}"
    return directory, ingredients


def _open(directory, config, reused):
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    return PreparedData(root=directory, config=config, meta=meta, reused=reused)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def remove_dead_temporaries(cache_dir: Path) -> None:
    """Removes the temp dirs that killed prepares of this host left in cache_dir, and names them on one line. Only
    this host's: on a filesystem shared by several nodes, another node's pids say nothing about its processes."""
    of_this_host = re.compile(rf"\.tmp-.+@{re.escape(socket.gethostname())}-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for temporary in sorted(cache_dir.glob(".tmp-*")):
        match = of_this_host.fullmatch(temporary.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(temporary, ignore_errors=True)
            removed.append(temporary)
    if removed:
        print(f"removed {len(removed)} temporary store(s) left by killed data preparations: "
              f"{', '.join(map(str, removed))}", file=sys.stderr, flush=True)


def _tree_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _is_disk_full(error: BaseException, cache_dir: Path) -> bool:
    """ENOSPC/EDQUOT, or numpy's short-write error (np.save: "N requested and M written", no errno) on a disk with
    less than NEARLY_FULL bytes left."""
    return isinstance(error, OSError) and (error.errno in DISK_FULL or (
        error.errno is None and shutil.disk_usage(cache_dir).free < NEARLY_FULL))


def _disk_full_error(error: OSError, cache_dir: Path, written: int) -> OSError:
    return OSError(error.errno or errno.ENOSPC, (
        f"disk full while writing the prepared data into {cache_dir}: the store had reached {written:,} bytes when "
        f"writing failed ({error}), and {shutil.disk_usage(cache_dir).free:,} bytes are free there; the partial "
        f"store was removed, nothing is left behind. Free space in {cache_dir} and run again"))


def prepare(config, tokenizer: Tokenizer, cache_dir=None, skip_bad_records: bool = False,
            split_special_tokens: bool = False) -> PreparedData:
    """Tokenize the mixture into the cache, or reuse the store when its key matches."""
    config = _as_config(config)
    directory, ingredients = _store_dir(config, tokenizer, cache_dir, skip_bad_records, split_special_tokens)
    if directory.parent.is_dir():
        remove_dead_temporaries(directory.parent)
    if (directory / META).is_file():
        return _open(directory, config, reused=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A private temp dir renamed into place: a killed prepare leaves only a .tmp-* directory (removed above next time).
    temporary = directory.parent / (f".tmp-{directory.name}@{socket.gethostname()}-{os.getpid()}-"
                                    f"{uuid.uuid4().hex[:8]}")
    try:
        _write_stores(temporary, config, tokenizer, ingredients, skip_bad_records, split_special_tokens)
        try:
            temporary.rename(directory)
        except OSError:
            if not (directory / META).is_file():
                raise
            shutil.rmtree(temporary)  # another process finished the same store first
            return _open(directory, config, reused=True)
    except BaseException as error:
        disk_full = _is_disk_full(error, directory.parent)
        written = _tree_size(temporary) if disk_full else 0
        shutil.rmtree(temporary, ignore_errors=True)
        if disk_full:
            raise _disk_full_error(error, directory.parent, written) from error
        raise
    return _open(directory, config, reused=False)


def load_prepared(config, tokenizer: Tokenizer, require_existing: bool = False, cache_dir=None,
                  skip_bad_records: bool = False, split_special_tokens: bool = False) -> PreparedData:
    """The prepared store for this config and tokenizer.

    require_existing=True (what --use_prepared means) never tokenizes: a missing or stale
    store is an error that says which command prepares it.
    """
    config = _as_config(config)
    if not require_existing:
        return prepare(config, tokenizer, cache_dir, skip_bad_records, split_special_tokens)
    directory, _ = _store_dir(config, tokenizer, cache_dir, skip_bad_records, split_special_tokens)
    if (directory / META).is_file():
        return _open(directory, config, reused=True)
    stale = stale_stores(directory.parent, config, directory)
    reason = (f"the store at {stale[-1]} is stale: the data files, the config or the tokenizer changed since it "
              f"was prepared" if stale else f"nothing prepared in {directory.parent} for it")
    raise FileNotFoundError(
        f"{config.config_file}: no prepared data for this config and tokenizer {tokenizer.name_or_path} "
        f"(expected {directory}); {reason}. Run: python -m data.prepare {config.prepare_arguments} "
        f"--tokenizer {tokenizer.name_or_path}" + (f" --cache_dir {cache_dir}" if cache_dir else "")
        + (" --skip_bad_records" if skip_bad_records else "")
        + (" --split_special_tokens" if split_special_tokens else ""))


def skipped_records(prepared: PreparedData) -> dict:
    """Bad records skipped per input file (files with none left out)."""
    return {source["path"]: source["skipped_records"] for source in prepared.meta["sources"]
            if source.get("skipped_records")}


def skipped_records_report(prepared: PreparedData) -> list[str]:
    return [f"skipped {source['skipped_records']} bad record(s) of {source['path']} (--skip_bad_records); "
            f"the first: {source['bad_records'][0]}"
            for source in prepared.meta["sources"] if source.get("skipped_records")]


def describe_counts(counts: dict) -> str:
    return (f"docs {counts['docs']:,}  tokens {counts['tokens']:,}  supervised {counts['supervised_tokens']:,}  "
            f"truncated {counts['truncated_docs']:,}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data_config", help="data-mixture YAML, e.g. config/data/pretrain/demo.yaml")
    data.add_argument("--data_path", help="one jsonl file: a mixture of that one source (with --kind, --max_seq_len)")
    parser.add_argument("--kind", choices=KINDS, help="with --data_path: its data kind")
    parser.add_argument("--max_seq_len", type=int, help="with --data_path: the sequence length")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER_DIR), help="tokenizer directory")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--skip_bad_records", action="store_true", help="skip and count bad records")
    parser.add_argument("--split_special_tokens", action="store_true",
                        help="encode special-token strings in pretrain text as plain text (default: their ids)")
    args = parser.parse_args()
    if args.data_path and (args.kind is None or args.max_seq_len is None):
        parser.error("--data_path needs --kind and --max_seq_len")
    started = time.time()
    config = (one_source_config(args.data_path, args.kind, args.max_seq_len) if args.data_path
              else load_data_config(args.data_config))
    prepared = prepare(config, load_tokenizer(args.tokenizer), args.cache_dir, args.skip_bad_records,
                       args.split_special_tokens)
    print(f"{'reused' if prepared.reused else 'prepared'} {prepared.root} ({time.time() - started:.1f}s)")
    for line in skipped_records_report(prepared):
        print(f"  {line}")
    for split, counts in prepared.meta["splits"].items():
        for side, side_counts in (counts.items() if prepared.kind == "dpo" else [("", counts)]):
            print(f"  {split:5s} {side:8s} {describe_counts(side_counts)}")


if __name__ == "__main__":
    main()
