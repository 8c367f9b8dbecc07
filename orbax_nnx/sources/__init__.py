"""Reading stored metadata and array regions: Orbax items, Hugging Face safetensors, live models."""
