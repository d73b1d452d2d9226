"""Pretraining: next-token prediction on plain text, packed rows with document boundaries, from scratch.

    python train/pretrain.py --data_config config/data/pretrain/demo.yaml
    deepspeed --num_gpus 2 train/pretrain.py --deepspeed ds_configs/zero2.json ...
"""
from train.cli import main
from train.stage import LanguageModelStage

if __name__ == "__main__":
    main(LanguageModelStage("pretrain", data_kind="pretrain", default_packing="packed"),
         dict(data_config="config/data/pretrain/demo.yaml", from_weight="none", learning_rate=5e-4))
