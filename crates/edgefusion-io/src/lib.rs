//! Model file formats: GGUF, safetensors / Hugging Face folders.
