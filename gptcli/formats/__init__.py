"""Model formats beyond OpenAI's and Hugging Face's: the book's `.pth` state dicts (`book`) and
llama.cpp's GGUF (`gguf`). Each turns a file into a conversion plan (see `gptcli.convert`) and/or
writes a plan out."""
