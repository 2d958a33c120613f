"""The model: flat parameter buffers with named views (params), the layers (layers/), their
op table (ops), the stages (stages) and the GPT as their chain (gpt)."""
