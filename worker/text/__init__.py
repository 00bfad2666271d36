"""Text in and out of the model: `tokenizer` (the Llama-3-style byte-level BPE built locally for
synthetic checkpoints), `checkpoint` (a checkpoint's tokenizer from local files only: the
`tokenizers` library directly where that is identical to transformers' AutoTokenizer, else
AutoTokenizer), `prompts` (prompt files made to an exact token length, and the seed's rules for
the batch as fed: each prompt encoded alone, its tail kept, cycled to the batch size) and
`poolcache` (the words prompts are drawn from, kept on disk per tokenizer for the next process).
"""
