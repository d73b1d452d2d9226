"""Midtraining: more next-token prediction on a new domain, mixed with replay of pretrain text.

    python train/midtrain.py --data_config config/data/midtrain/demo.yaml --from_weight pretrain
"""
from train.cli import main
from train.stage import LanguageModelStage

if __name__ == "__main__":
    main(LanguageModelStage("midtrain", data_kind="pretrain", default_packing="packed"),
         dict(data_config="config/data/midtrain/demo.yaml", from_weight="pretrain", learning_rate=3e-4))
