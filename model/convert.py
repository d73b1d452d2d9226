"""Write an existing zerostage export in Hugging Face transformers' format (what a stage now exports to export/hf).

    python -m model.convert out/sft/export                 # -> out/sft/export/hf
    python -m model.convert out/sft/export --out my_model --tokenizer model/tokenizer --max_shard_gb 2

The tokenizer is the one the export's zerostage.json records, unless --tokenizer names another.
"""

import argparse
import json
import sys
from pathlib import Path

from data.tokenizer import load_tokenizer
from model.hf import save_hf
from model.weights import load_pretrained
from train.exports import hf_tokenizer_args


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="a zerostage export directory (config.json + model.safetensors)")
    parser.add_argument("--out", type=Path, help="where to write the transformers model (default: EXPORT/hf)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the one zerostage.json records)")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    args = parser.parse_args(argv)
    try:
        model = load_pretrained(args.export)
        tokenizer = load_tokenizer(args.tokenizer or _recorded_tokenizer(args.export))
        out = save_hf(model.state_dict(), model.config, args.out or args.export / "hf", **hf_tokenizer_args(tokenizer),
                      max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"python -m model.convert: {error}")
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained read it)")
    return out


def _recorded_tokenizer(export: Path) -> Path:
    provenance = export / "zerostage.json"
    if not provenance.is_file():
        raise ValueError(f"{export} records no tokenizer (no zerostage.json); give --tokenizer DIR")
    return Path(json.loads(provenance.read_text())["tokenizer"]["path"])


if __name__ == "__main__":
    main()
