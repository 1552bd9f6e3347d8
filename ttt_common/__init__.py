"""What `official_port`, `ponder` and `lact` share (only the trainer imports a model package, lazily, by name).

Modules (import what you need from them; this package re-exports nothing):
    modules        RMSNorm and rotary position embedding (RoPE)
    model_inputs   checks of a causal LM's forward inputs, the shared LM head + next-token loss
    hf_compat      the transformers generation contract across the supported 5.x releases
    files          atomic writes, checksummed torch files, stale temporaries, LRU size caps
    data, tokenizer, packing, shards, prepare_data
                   offline corpora and tokenizers, packed sequences, memory-mapped token shards
    trainer        the training loop (`python -m ttt_common.trainer`, under torchrun for several ranks)
    train_utils    learning-rate schedule, RNG state, non-finite loss guard, allocator setting
    checkpoint     atomic, verified DCP checkpoints; export: checkpoint -> Hugging Face folder
    parallelize    activation checkpointing, torch.compile and FSDP2 applied from outside the model
    metrics        progress bar, JSONL metrics and the loss plot
    cli            one error line and exit code for every command-line tool
    config_files   the bundled model configs, found by name
    triton_jit     Triton kernels jitted lazily, once per TRITON_INTERPRET value
"""
