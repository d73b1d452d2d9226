"""Generate the offline demo corpus into dataset/ (gitignored).

Everything comes from the Python installation running this script, so the demo
needs no download and is identical on every machine with the same Python:

  pretrain.jsonl   {"text"}           prose: stdlib docstrings + the language reference (pydoc_data)
  midtrain.jsonl   {"text"}           a new domain: stdlib source code, one function/class per doc
  sft.jsonl        {"conversations"}  verifiable tasks (first letter, capitals, arithmetic, string tasks) + Q&A from the docs
  dpo.jsonl        {"chosen","rejected"} verifiable tasks, rejected = a plausibly wrong answer
  rl_prompts.jsonl {"conversations","answer"} capitals prompts (yes/no) + reference answer for a rule-based reward
  rl_eval.jsonl    same form: held-out prompts that no other file contains (for honest eval)

Usage: python scripts/make_demo_data.py [--out_dir dataset] [--seed 0]
"""

import argparse
import ast
import importlib
import inspect
import json
import random
import re
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from train.config import REPO_ROOT
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Packages that are tests, GUIs, vendored tools or codec tables: poor prose, poor code samples.
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                "site-packages", "encodings", "__phello__", "pydoc_data", "distutils"}
# C modules whose docs are worth having and whose import has no side effects.
C_MODULES = ["builtins", "math", "cmath", "itertools", "operator", "time", "gc", "binascii", "zlib", "array"]
# The stdlib file posixpath.py is what users know as os.path.
PUBLIC_NAMES = {"posixpath": "os.path"}

PRETRAIN_BYTES = 3_000_000
MIDTRAIN_BYTES = 1_500_000
SFT_SINGLE_TURN, SFT_MULTI_TURN, SFT_DOC_QA = 2800, 500, 900
DPO_PAIRS, RL_PROMPTS, RL_EVAL_PROMPTS = 2000, 1000, 1000  # RL files keep the capitals tasks: a fifth

FIRST_LETTER_TEMPLATES = ("What is the first letter of '{}'?", "Which letter does '{}' start with?")
CAPITALS_TEMPLATES = ("Is '{}' written in capital letters?", "Is '{}' in uppercase?")
DOC_QUESTIONS = ["What does `{}` do?", "Briefly, what is `{}` for?", "Describe `{}` in one sentence."]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Reply with the answer only.",
    "You are MiniMind, a small language model. Answer briefly.",
]


# ---------------------------------------------------------------- stdlib walking

class Documented(NamedTuple):
    module: str
    name: str  # qualified: os.path.join
    signature: str  # "(a, *p)" for functions, "" otherwise
    doc: str


def stdlib_files():
    """(dotted module name, path) of the pure-Python stdlib, sorted for determinism."""
    files = []
    for path in sorted(STDLIB.rglob("*.py")):
        relative = path.relative_to(STDLIB)
        if SKIPPED_DIRS & set(relative.parts[:-1]) or relative.name == "__main__.py":
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            files.append((".".join(parts), path))
    return files


def parse(path):
    try:
        source = path.read_text(encoding="utf-8")
        return source, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None, None  # a few stdlib files are Python 2 samples or legacy encodings


def is_public(dotted):
    return not any(part.startswith("_") for part in dotted.split("."))


def documented_definitions(files):
    """Docstrings of modules, classes, functions and methods, in a fixed order."""
    for module, path in files:
        _, tree = parse(path)
        if tree is None:
            continue
        module = PUBLIC_NAMES.get(module, module)
        doc = ast.get_docstring(tree)
        if doc:
            yield Documented(module, module, "", doc)
        for node in tree.body:
            yield from definition_docs(node, module, module)
    for module in C_MODULES:
        yield from c_module_docs(importlib.import_module(module))


def definition_docs(node, module, prefix):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            yield Documented(module, f"{prefix}.{node.name}", f"({ast.unparse(node.args)})", doc)
    elif isinstance(node, ast.ClassDef):
        doc = ast.get_docstring(node)
        if doc:
            yield Documented(module, f"{prefix}.{node.name}", "", doc)
        for child in node.body:
            yield from definition_docs(child, module, f"{prefix}.{node.name}")


def c_module_docs(module):
    name = module.__name__
    if module.__doc__:
        yield Documented(name, name, "", inspect.cleandoc(module.__doc__))
    for attr in sorted(vars(module)):
        value = getattr(module, attr)
        if attr.startswith("_") or not (inspect.isroutine(value) or inspect.isclass(value)):
            continue
        doc = inspect.getdoc(value)
        if doc and getattr(value, "__module__", name) == name:
            yield Documented(name, f"{name}.{attr}", "", doc)


def first_sentence(doc):
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else None


# ---------------------------------------------------------------- pretrain: prose

def chunk_paragraphs(text, rng, min_chars=300, max_chars=3000):
    """Split at blank lines into documents whose sizes vary, so packing sees short and long docs."""
    docs, current, target = [], [], rng.randint(min_chars, max_chars)
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        if sum(map(len, current)) >= target:
            docs.append("\n\n".join(current))
            current, target = [], rng.randint(min_chars, max_chars)
    if current:
        docs.append("\n\n".join(current))
    return docs


def pretrain_documents(definitions, rng):
    per_module = {}
    for item in definitions:
        per_module.setdefault(item.module, []).append(f"{item.name}{item.signature}\n\n{item.doc}")
    docs = []
    for module in sorted(per_module):
        docs += chunk_paragraphs("\n\n".join(per_module[module]), rng)
    from pydoc_data.topics import topics  # the language reference, as shipped for help()
    for topic in sorted(topics):
        docs += chunk_paragraphs(topics[topic].strip(), rng)
    return take_within_budget(docs, PRETRAIN_BYTES, rng)


def take_within_budget(docs, budget_bytes, rng):
    docs = [doc for doc in docs if len(doc) >= 80]
    rng.shuffle(docs)
    taken, used = [], 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if used + size > budget_bytes:
            break
        taken.append(doc)
        used += size
    return taken


# ---------------------------------------------------------------- midtrain: code

def code_documents(files, rng, max_lines=80):
    docs = []
    for module, path in files:
        source, tree = parse(path)
        if tree is None:
            continue
        lines = source.splitlines()
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            block = lines[start:node.end_lineno]
            for window in range(0, len(block), max_lines):
                body = "\n".join(block[window:window + max_lines]).strip("\n")
                docs.append(f"# {module}\n{body}\n")
    return take_within_budget(docs, MIDTRAIN_BYTES, rng)


# ---------------------------------------------------------------- verifiable tasks

def arithmetic_task(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        question, answer = f"{a} + {b}", a + b
    else:
        a, b = max(a, b), min(a, b)  # keep answers non-negative: fewer symbols to learn
        question, answer = f"{a} - {b}", a - b
    template = rng.choice(["What is {}?", "Compute {}.", "{} = ?"])
    error = rng.choice([1, 2, 10])
    wrong = answer - error if answer >= error and rng.random() < 0.5 else answer + error
    return template.format(question), str(answer), str(wrong)


def reverse_task(rng, words):
    word = rng.choice(words)
    answer = word[::-1]
    # Swap two differing neighbours: wrong by one transposition, the typical near miss.
    i = rng.choice([i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]])
    wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    template = rng.choice(["Reverse the word '{}'.", "Spell '{}' backwards."])
    return template.format(word), answer, wrong


def count_task(rng, words):
    word = rng.choice(words)
    answer = len(word)
    template = rng.choice(["How many letters are in the word '{}'?", "Count the letters in '{}'."])
    return template.format(word), str(answer), str(answer + rng.choice([-1, 1]))


def uppercase_task(rng, words):
    word = rng.choice(words)
    template = rng.choice(["Write '{}' in uppercase.", "Convert '{}' to capital letters."])
    return template.format(word), word.upper(), word.capitalize()


def sort_task(rng, words):
    chosen = rng.sample(words, rng.randint(3, 4))
    answer = sorted(chosen)
    i = rng.randrange(len(answer) - 1)
    wrong = answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:]
    template = rng.choice(["Sort these words alphabetically: {}", "Put in alphabetical order: {}"])
    return template.format(", ".join(chosen)), ", ".join(answer), ", ".join(wrong)


def first_letter_task(rng, words):
    word = rng.choice(words)
    template = rng.choice(FIRST_LETTER_TEMPLATES)
    wrong = word[1] if word[1] != word[0] else word[-1]  # another letter of the same word
    return template.format(word), word[0], wrong


def capitals_task(rng, words):
    word = rng.choice(words)
    upper = rng.random() < 0.5
    answer, wrong = ("yes", "no") if upper else ("no", "yes")
    return rng.choice(CAPITALS_TEMPLATES).format(word.upper() if upper else word), answer, wrong


def verifiable_task(rng, words):
    """(prompt, correct answer, plausibly wrong answer)."""
    # Whether a word is written in capitals is what the tiny model learns within the demo's SFT (its tokens show it,
    # on held-out words too): RL then starts from answers that are right more often than not, greedy or sampled.
    # The first letter is the next easiest, then arithmetic; each other string task once.
    kind = rng.choice(["first_letter", "first_letter", "capitals", "capitals", "arithmetic", "arithmetic", "reverse",
                       "count", "uppercase", "sort"])
    if kind == "arithmetic":
        return arithmetic_task(rng)
    return {"first_letter": first_letter_task, "capitals": capitals_task, "reverse": reverse_task, "count": count_task,
            "uppercase": uppercase_task, "sort": sort_task}[kind](rng, words)


def unique_tasks(count, rng, words, used_prompts):
    """Tasks whose prompts appear nowhere else in the demo: held-out prompts stay held out."""
    tasks = []
    while len(tasks) < count:
        task = verifiable_task(rng, words)
        if task[0] not in used_prompts:
            used_prompts.add(task[0])
            tasks.append(task)
    return tasks


def vocabulary(definitions):
    """Common lowercase words of the docs: task inputs the model has read during pretraining."""
    counts = Counter()
    for item in definitions:
        counts.update(re.findall(r"\b[a-z]{3,8}\b", item.doc))
    return sorted(word for word, n in counts.items() if n >= 5 and len(set(word)) > 1)


def doc_questions(definitions, rng):
    questions, asked = [], set()
    for item in definitions:
        sentence = first_sentence(item.doc)
        if item.name == item.module or item.name in asked or not is_public(item.name):
            continue
        if sentence and 20 <= len(sentence) <= 160:
            asked.add(item.name)  # one answer per name: methods can be documented twice
            template = rng.choice(DOC_QUESTIONS)
            questions.append((template.format(item.name), sentence))
    rng.shuffle(questions)
    return questions


# ---------------------------------------------------------------- records

def message(role, content):
    return {"role": role, "content": content}


def with_system(rng, messages, probability=0.3):
    if rng.random() < probability:
        return [message("system", rng.choice(SYSTEM_PROMPTS))] + messages
    return messages


def sft_records(rng, tasks, multi_turn_tasks, questions):
    records = []
    for prompt, answer, _ in tasks:
        records.append(with_system(rng, [message("user", prompt), message("assistant", answer)]))
    for prompt, answer in questions:
        records.append(with_system(rng, [message("user", prompt), message("assistant", answer)]))
    for i in range(0, len(multi_turn_tasks) - 2, 3):
        turns = []
        for prompt, answer, _ in multi_turn_tasks[i:i + rng.randint(2, 3)]:
            turns += [message("user", prompt), message("assistant", answer)]
        records.append(with_system(rng, turns))
    rng.shuffle(records)
    return [{"conversations": conversation} for conversation in records]


def dpo_records(rng, tasks):
    records = []
    for prompt, answer, wrong in tasks:
        prefix = with_system(rng, [message("user", prompt)], probability=0.2)
        records.append({"chosen": prefix + [message("assistant", answer)],
                        "rejected": prefix + [message("assistant", wrong)]})
    return records


def capitals_tasks(tasks):
    patterns = [re.escape(template).replace(r"\{\}", r"[a-zA-Z]+") for template in CAPITALS_TEMPLATES]
    return [task for task in tasks if any(re.fullmatch(pattern, task[0]) for pattern in patterns)]


def rl_records(tasks):
    return [{"conversations": [message("user", prompt)], "answer": answer} for prompt, answer, _ in tasks]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"  {path.name:18s} {len(records):6d} records  {path.stat().st_size / 1e6:6.2f} MB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "dataset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    rng = random.Random(args.seed)
    files = stdlib_files()
    definitions = list(documented_definitions(files))
    words = vocabulary(definitions)

    used_prompts = set()
    # Held-out prompts are drawn first so that no training file can contain them.
    eval_tasks = unique_tasks(RL_EVAL_PROMPTS, rng, words, used_prompts)
    sft_tasks = unique_tasks(SFT_SINGLE_TURN, rng, words, used_prompts)
    multi_turn_tasks = unique_tasks(SFT_MULTI_TURN * 3, rng, words, used_prompts)
    dpo_tasks = unique_tasks(DPO_PAIRS, rng, words, used_prompts)
    rl_tasks = unique_tasks(RL_PROMPTS, rng, words, used_prompts)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"writing {args.out_dir} (Python {STDLIB.name}, {len(files)} stdlib files, {len(words)} task words)")
    write_jsonl(args.out_dir / "pretrain.jsonl", [{"text": t} for t in pretrain_documents(definitions, rng)])
    write_jsonl(args.out_dir / "midtrain.jsonl", [{"text": t} for t in code_documents(files, rng)])
    questions = doc_questions(definitions, rng)[:SFT_DOC_QA]
    write_jsonl(args.out_dir / "sft.jsonl", sft_records(rng, sft_tasks, multi_turn_tasks, questions))
    write_jsonl(args.out_dir / "dpo.jsonl", dpo_records(rng, dpo_tasks))
    # RL learns only from answers that are sometimes right: its prompts are the one family whose sampled answers the
    # SFT model gets right often (the others score near 0 whatever it samples). Filtering leaves other files as drawn.
    write_jsonl(args.out_dir / "rl_prompts.jsonl", rl_records(capitals_tasks(rl_tasks)))
    write_jsonl(args.out_dir / "rl_eval.jsonl", rl_records(capitals_tasks(eval_tasks)))
    print(f"done in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
