"""The model formats gptcli reads and writes, one module each: `openai` (OpenAI's TensorFlow release,
read through `tfbundle`), `hf` (Hugging Face), `gptcli` (gptcli's own model files), `book` (the
chapter's state dicts) and `gguf` (llama.cpp).

Each has the same small interface (the protocols in `registry`, which also holds the table of them):
`NAME`; `detect(path) -> bool`; `describe(path, ReadOptions) -> Description` (what `gptcli info`
shows); where the format is read, `read_plan(path, ReadOptions) -> ConversionPlan`; where it is
written, `write(plan, out, WriteOptions, on_tensor) -> Path`. The plan types are in `plan`; what
several formats share is in `gpt2` (OpenAI's and Hugging Face's GPT-2 layout) and `safetensors_io`.

Nothing here imports `gptcli.convert` or `gptcli.info`; they dispatch through `registry`. This
package's `__init__` imports nothing, so importing one format does not import the others.
"""
