"""gptcli: pretrain GPT-2-style models from scratch and load OpenAI's GPT-2 weights."""

__version__ = "0.1.0"
