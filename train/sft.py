"""Supervised fine-tuning: chat conversations, loss on the assistant turns only.

    python train/sft.py --data_config config/data/posttrain/sft/general.yaml --from_weight midtrain
"""
from train.cli import main
from train.stage import LanguageModelStage

if __name__ == "__main__":
    main(LanguageModelStage("sft", data_kind="sft", default_packing="padded"),
         dict(data_config="config/data/posttrain/sft/general.yaml", from_weight="midtrain", learning_rate=2e-4))
