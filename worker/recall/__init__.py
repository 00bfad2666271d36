"""The recall model: a small Llama the project trains itself on a long-context retrieval task, the
reference model for accuracy claims about top-k block attention (issue 14.1).

In data-flow order: `vocab` is the task's word-level tokenizer (built locally with `tokenizers`);
`task` samples the task (key→value records in filler, a query for one key) and scores answers;
`train` trains HF `LlamaForCausalLM` on it with AdamW and a curriculum over lengths; `build` holds
the two sizes (cpu, gpu), writes the HF checkpoint (`bench make-model DIR --preset recall`) and
copies the committed cpu-size one; `passkey` runs passkey prompts through the engine
(`worker.run.run`) under given KV settings and checks the answers.
"""
