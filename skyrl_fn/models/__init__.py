"""Models: the embedded tiny Llama, tokenizers, pretrained (HF directory, GGUF, packaged) loading.
"""
