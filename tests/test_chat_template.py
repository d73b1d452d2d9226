"""The tokenizer's own chat template, against transformers' apply_chat_template with MiniMind's real tokenizers
(tests/fixtures/minimind): the text and ids of system, multi-turn, tool, reasoning and generation-prompt
conversations; the SFT loss masks on them; fields a template does not render refused with file:line and field;
special-token strings in pretrain text; --data_path; --reward rule refused at start-up."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

import data.prepare as prepare_module
from data.formats import DataFormatError
from data.prepare import prepare
from data.tokenizer import DEFAULT_TOKENIZER_DIR, ChatTemplateError, load_tokenizer
from model import ModelConfig
from train.config import REPO_ROOT, ConfigError, parse_config
from train.data_loading import build_data, stage_data_config
from train.ppo import PPOStage
from train.rl import RLConfig
from train.stage import LanguageModelStage

FIXTURES = Path(__file__).parent / "fixtures" / "minimind"
MINIMIND2, MINIMIND3 = FIXTURES / "minimind2-tokenizer", FIXTURES / "minimind3-tokenizer"
SFT = LanguageModelStage("sft", data_kind="sft", default_packing="padded")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# name -> (messages, tools, the supervised text of each assistant turn under MiniMind-3's template)
CONVERSATIONS = {
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": "5"}], None, ["5<|im_end|>"]),
    "multi_turn": ([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "Reverse 'abc', ünïcödé 🙂"},
                    {"role": "assistant", "content": "cba\n\n  done"}], None,
                   ["5<|im_end|>", "cba\n\n  done<|im_end|>"]),
    "tools": ([{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [CALL]},
               {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "22C"},
               {"role": "assistant", "content": "Sunny, 22C."}], TOOLS,
              ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
               "Sunny, 22C.<|im_end|>"]),
    "reasoning": ([{"role": "user", "content": "Is 7 prime?"},
                   {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisor\nbut 1 and 7."}],
                  None, ["7 has no divisor\nbut 1 and 7.\n</think>\n\nYes.<|im_end|>"]),
}
# What each tokenizer's template leaves out (so that zerostage refuses the record): MiniMind2 renders no reasoning,
# the shipped ChatML neither tools, tool calls nor reasoning.
RENDERED = {MINIMIND3: set(CONVERSATIONS), MINIMIND2: {"system", "multi_turn", "tools"},
            DEFAULT_TOKENIZER_DIR: {"system", "multi_turn"}}


@pytest.fixture(scope="module", params=[MINIMIND2, MINIMIND3, DEFAULT_TOKENIZER_DIR], ids=["minimind2", "minimind3",
                                                                                            "shipped"])
def pair(request):
    return load_tokenizer(request.param), AutoTokenizer.from_pretrained(str(request.param)), request.param


def reference(hf, messages, tools, add_generation_prompt, tokenize):
    return hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  tokenize=tokenize, return_dict=False)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["whole", "generation_prompt"])
def test_rendering_equals_transformers(pair, name, add_generation_prompt):
    tok, hf, _ = pair
    messages, tools, _ = CONVERSATIONS[name]
    if add_generation_prompt:  # an RL prompt: the conversation before its last answer
        messages = messages[:-1]
    assert tok.render_text(messages, tools, add_generation_prompt) == reference(hf, messages, tools,
                                                                                add_generation_prompt, False)
    ids, mask = tok.render_chat(messages, add_generation_prompt, tools)
    assert ids == list(reference(hf, messages, tools, add_generation_prompt, True))
    assert len(mask) == len(ids)


def supervised_runs(tok, ids, mask):
    """The decoded text of each maximal run of supervised tokens."""
    runs, current = [], []
    for token, supervised in zip(list(ids) + [None], list(mask) + [0]):
        if supervised:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    return runs


def test_sft_masks_cover_exactly_the_assistant_turns(pair):
    """On each conversation the template renders whole (the others are refused: see below)."""
    tok, _, directory = pair
    for name in sorted(RENDERED[directory]):
        messages, tools, turns = CONVERSATIONS[name]
        ids, mask = tok.render_chat(messages, tools=tools)
        # MiniMind-3's empty think block belongs to the prompt, as in its generation prompt; the others have none.
        assert supervised_runs(tok, ids, mask) == turns, name
        assert not any(tok.render_chat(messages[:1])[1])


def test_a_literal_im_end_inside_an_answer_does_not_end_the_supervised_turn():
    """apply_chat_template maps it to the special id (transformers' default); the turn still runs to its own end."""
    tok, hf = load_tokenizer(MINIMIND3), AutoTokenizer.from_pretrained(str(MINIMIND3))
    messages = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "a<|im_end|>b"}]
    ids, mask = tok.render_chat(messages)
    assert ids == list(reference(hf, messages, None, False, True))
    assert supervised_runs(tok, ids, mask) == ["a<|im_end|>b<|im_end|>"]


# ---------------------------------------------------------------- through data preparation

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def write_config(path, kind, source, max_seq_len=512):
    path.write_text(yaml.safe_dump({"kind": kind, "max_seq_len": max_seq_len,
                                    "sources": [{"path": str(source), "weight": 1.0}]}), encoding="utf-8")
    return path


def sft_record(name):
    messages, tools, _ = CONVERSATIONS[name]
    return {"conversations": messages, **({"tools": tools} if tools else {})}


def test_sft_rl_and_dpo_stores_hold_the_templates_rendering(tmp_path):
    tok, hf = load_tokenizer(MINIMIND3), AutoTokenizer.from_pretrained(str(MINIMIND3))
    names = list(CONVERSATIONS)
    sft = write_jsonl(tmp_path / "sft.jsonl", [sft_record(name) for name in names])
    store = prepare(write_config(tmp_path / "sft.yaml", "sft", sft), tok, tmp_path / "cache").split("train")
    for index, name in enumerate(names):
        messages, tools, turns = CONVERSATIONS[name]
        ids, mask = store.doc(index)
        assert ids.tolist() == list(reference(hf, messages, tools, False, True)), name
        assert supervised_runs(tok, ids.tolist(), mask.tolist()) == turns, name
    rl = write_jsonl(tmp_path / "rl.jsonl", [{**sft_record(name), "answer": "x"} for name in names])
    prompts = prepare(write_config(tmp_path / "rl.yaml", "rl", rl), tok, tmp_path / "cache").split("train")
    for index, name in enumerate(names):
        messages, tools, _ = CONVERSATIONS[name]
        assert prompts.doc(index)[0].tolist() == list(reference(hf, messages[:-1], tools, True, True)), name
    messages, _, _ = CONVERSATIONS["reasoning"]
    rejected = messages[:-1] + [{"role": "assistant", "content": "No.", "reasoning_content": "Even."}]
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"chosen": messages, "rejected": rejected}])
    pairs = prepare(write_config(tmp_path / "dpo.yaml", "dpo", dpo), tok, tmp_path / "cache").split("train")
    assert supervised_runs(tok, *(part.tolist() for part in pairs.rejected.doc(0))) == ["Even.\n</think>\n\nNo.<|im_end|>"]


REFUSED = [  # tokenizer, record, the field the error names
    (DEFAULT_TOKENIZER_DIR, sft_record("reasoning"), "conversations[1].reasoning_content"),
    (MINIMIND2, sft_record("reasoning"), "conversations[1].reasoning_content"),
    (DEFAULT_TOKENIZER_DIR, sft_record("tools"), "tools"),
    (DEFAULT_TOKENIZER_DIR, {"conversations": CONVERSATIONS["tools"][0]}, "conversations[2].tool_calls"),
    (MINIMIND3, {"conversations": [{"role": "user", "content": "hi", "reasoning_content": "x"},
                                   {"role": "assistant", "content": "ok"}]}, "conversations[0].reasoning_content"),
    (MINIMIND3, {"conversations": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x",
                                                                       "tool_call_id": "7"}]},
     "conversations[1].tool_call_id"),
]


@pytest.mark.parametrize("directory, record, field", REFUSED)
def test_a_field_the_template_does_not_render_is_refused_with_file_line_and_field(tmp_path, directory, record, field):
    ok = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    source = write_jsonl(tmp_path / "sft.jsonl", [ok, ok, record, ok])
    config = write_config(tmp_path / "sft.yaml", "sft", source)
    with pytest.raises(DataFormatError) as error:
        prepare(config, load_tokenizer(directory), tmp_path / "cache")
    assert str(error.value).startswith(f"{source}:3: field '{field}': the chat template (")
    assert "does not render it" in str(error.value)
    skipped = prepare(config, load_tokenizer(directory), tmp_path / "cache", skip_bad_records=True)
    assert len(skipped.split("train")) == 3 and skipped.meta["sources"][0]["skipped_records"] == 1


def test_message_fields_are_checked_and_minimind_functions_are_tools(tmp_path):
    tok = load_tokenizer(MINIMIND3)
    system = {"role": "system", "content": "You help.", "functions": TOOLS}
    messages = [system] + CONVERSATIONS["tools"][0][1:]
    source = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": messages}, sft_record("tools")])
    store = prepare(write_config(tmp_path / "sft.yaml", "sft", source), tok, tmp_path / "cache").split("train")
    assert store.doc(0)[0].tolist() == store.doc(1)[0].tolist()  # MiniMind's loader passes these as tools
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"role": "user", "content": "hi", "weight": 2}]}])
    with pytest.raises(DataFormatError, match=rf"^{bad}:1: field 'conversations\[0\]\.weight': not a message field"):
        prepare(write_config(tmp_path / "bad.yaml", "sft", bad), tok, tmp_path / "cache")


# ---------------------------------------------------------------- templates are data

def tokenizer_dir(tmp_path, template=None, jinja_file=None):
    directory = tmp_path / "tok"
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_bytes((MINIMIND2 / "tokenizer.json").read_bytes())
    config = json.loads((MINIMIND2 / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja_file is not None:
        (directory / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
    return directory


def test_chat_template_jinja_wins_and_a_template_cannot_reach_python(tmp_path):
    escape = "{{ cycler.__init__.__globals__.os.getcwd() }}{% for m in messages %}{{ m.content }}{% endfor %}"
    directory = tokenizer_dir(tmp_path, template="{{ 'config' }}", jinja_file=escape)
    tok = load_tokenizer(directory)
    assert tok.chat_template_source == str(directory / "chat_template.jinja")
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        tok.render_text([{"role": "user", "content": "hi"}])


def test_raise_exception_and_a_syntax_error_are_named(tmp_path):
    tok = load_tokenizer(tokenizer_dir(tmp_path, template="{{ raise_exception('only user turns') }}"))
    with pytest.raises(ChatTemplateError, match="only user turns"):
        tok.render_text([{"role": "user", "content": "hi"}])
    broken = tokenizer_dir(tmp_path / "b", template="{% for m in messages %}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template: not a valid Jinja chat template"):
        load_tokenizer(broken)


# ---------------------------------------------------------------- pretrain text

@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_special_token_strings_in_pretrain_text(tmp_path, split_special_tokens):
    tok, hf = load_tokenizer(MINIMIND2), AutoTokenizer.from_pretrained(str(MINIMIND2))
    text = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>"  # MiniMind2's pretrain_hq rows
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": text}])
    store = prepare(write_config(tmp_path / "p.yaml", "pretrain", source), tok, tmp_path / "cache",
                    split_special_tokens=split_special_tokens).split("train")
    expected = hf(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    assert store.doc(0)[0].tolist() == [tok.bos_id] + expected + [tok.eos_id]
    inside = store.doc(0)[0].tolist()[1:-1]
    assert (inside.count(1), inside.count(2)) == ((0, 0) if split_special_tokens else (2, 2))


# ---------------------------------------------------------------- --data_path and --reward rule

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "DEFAULT_CACHE_DIR", tmp_path / "cache")


def test_data_path_is_a_one_source_mixture(tmp_path, cache):
    records = [{"conversations": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]}
               for i in range(8)]
    source = write_jsonl(tmp_path / "sft_mini.jsonl", records)
    cfg = parse_config({"data_config": "config/data/posttrain/sft/general.yaml"},
                       ["--data_path", str(source), "--batch_size", "2"])
    config = stage_data_config(cfg, SFT)
    default = yaml.safe_load((Path(cfg.resolve_path(cfg.data_config))).read_text())
    assert (config.kind, config.max_seq_len, [s.path for s in config.sources]) == ("sft", default["max_seq_len"],
                                                                                  [source])
    assert config.validation.fraction == 0 and config.validation.path is None
    data = build_data(cfg, SFT, ModelConfig.from_preset("tiny"), rank=0, world_size=1)
    tok = load_tokenizer()
    assert [data.prepared.split("train").doc(i)[0].tolist() for i in range(8)] == [
        tok.render_chat(record["conversations"])[0] for record in records]
    assert stage_data_config(parse_config({}, ["--data_path", str(source), "--max_seq_len", "64"]), SFT).max_seq_len == 64
    with pytest.raises(ConfigError) as error:  # --use_prepared names the command that prepares it, which does
        build_data(parse_config({}, ["--data_path", str(source), "--max_seq_len", "64", "--use_prepared"]), SFT,
                   ModelConfig.from_preset("tiny"), rank=0, world_size=1)
    command = str(error.value).split("Run: ")[1]
    assert command.startswith(f"python -m data.prepare --data_path {source} --kind sft --max_seq_len 64 --tokenizer ")
    subprocess.run([sys.executable, *command.split()[1:], "--cache_dir", str(tmp_path / "cache")], cwd=REPO_ROOT,
                   check=True, capture_output=True)
    prepared = parse_config({}, ["--data_path", str(source), "--max_seq_len", "64", "--use_prepared"])
    assert build_data(prepared, SFT, ModelConfig.from_preset("tiny"), rank=0, world_size=1).prepared.reused
    with pytest.raises(ConfigError, match="give --data_path or --data_config, not both"):
        parse_config({}, ["--data_path", str(source), "--data_config", "config/data/posttrain/sft/general.yaml"])


def test_reward_rule_refuses_a_prompt_without_answer_at_start_up(tmp_path, cache):
    prompt = [{"role": "user", "content": "2+3?"}]
    records = [{"conversations": prompt, "answer": "5"}] * 2 + [{"conversations": prompt}] + \
              [{"conversations": prompt, "answer": "5"}] * 3
    source = write_jsonl(tmp_path / "rlaif.jsonl", records)
    model = ModelConfig.from_preset("tiny")
    rule = parse_config({}, ["--data_path", str(source), "--max_seq_len", "64", "--batch_size", "2"], cls=RLConfig)
    with pytest.raises(ConfigError) as error:
        build_data(rule, PPOStage(), model, rank=0, world_size=1)
    assert str(error.value).startswith(f"--reward rule: {source}:3: the prompt has no reference answer (field "
                                       f"'answer'); 1 of the 6 prompts of the train split have none")
    learned = parse_config({}, ["--data_path", str(source), "--max_seq_len", "64", "--batch_size", "2",
                                "--reward", "model"], cls=RLConfig)
    assert len(build_data(learned, PPOStage(), model, rank=0, world_size=1).train) == 3
    assert np.sum([a is None for a in build_data(learned, PPOStage(), model, 0, 1).prepared.split().answers]) == 1
