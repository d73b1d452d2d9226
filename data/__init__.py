"""The data side: tokenizer, jsonl formats, mixture configs, cached token stores and loaders.

    data.tokenizer  load_tokenizer, Tokenizer (render_chat with the tokenizer's own chat template)
    data.formats    MiniMind jsonl schemas
    data.mixture    load_data_config -> DataConfig
    data.prepare    prepare / load_prepared -> PreparedData (python -m data.prepare)
    data.store      TokenStore, PairedStore: the memory-mapped arrays
    data.loader     BatchLoader: packed/padded training batches
    data.prompts    PromptLoader: RL prompt batches
"""
