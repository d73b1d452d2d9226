"""Train the shipped byte-level BPE tokenizer (MiniMind's recipe) on the demo corpus.

    python scripts/make_demo_data.py      # writes dataset/
    python scripts/train_tokenizer.py     # writes model/tokenizer/{tokenizer.json,tokenizer_config.json}

Vocabulary 6400 with MiniMind's special tokens and ids: <|endoftext|>=0 (pad, unk),
<|im_start|>=1 (bos), <|im_end|>=2 (eos). Trained on the text of pretrain.jsonl,
midtrain.jsonl and the messages of sft.jsonl as "{role}\n{content}" (so that the ChatML
role headers are single tokens), read in file order.

Determinism: the corpus is deterministic (make_demo_data.py is seeded and reads only
the local Python installation) and the `tokenizers` BPE trainer breaks count ties by
token order, so the same Python + tokenizers versions reproduce tokenizer.json byte for
byte. A different Python version yields a different corpus, hence a different (equally
valid) tokenizer; the files in model/tokenizer/ are the shipped reference. Changing them
changes the tokenizer fingerprint, which invalidates every prepared-data cache.
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.config import REPO_ROOT
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in this order
MODEL_MAX_LENGTH = 32768
# ChatML as MiniMind renders it, without its tool-calling and thinking branches:
# each message is <|im_start|>{role}\n{content}<|im_end|>\n. data/tokenizer.py renders the same text.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus(data_dir):
    for name in ["pretrain.jsonl", "midtrain.jsonl"]:
        with open(data_dir / name, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
    with open(data_dir / "sft.jsonl", encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["conversations"]:
                yield f"{message['role']}\n{message['content']}"


def tokenizer_config():
    added_tokens = {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens,
        "additional_special_tokens": [],
        "bos_token": "<|im_start|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=REPO_ROOT / "dataset")
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "model" / "tokenizer")
    parser.add_argument("--vocab_size", type=int, default=6400)
    args = parser.parse_args()
    for name in ["pretrain.jsonl", "midtrain.jsonl", "sft.jsonl"]:
        if not (args.data_dir / name).is_file():
            parser.error(f"{args.data_dir / name} not found; run python scripts/make_demo_data.py first")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk at run time
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(args.data_dir), trainer=trainer)
    tokenizer.decoder = decoders.ByteLevel()
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"{token} got id {tokenizer.token_to_id(token)}"

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out_dir / "tokenizer.json"))
    with open(args.out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out_dir} (vocab {tokenizer.get_vocab_size()})")


if __name__ == "__main__":
    main()
